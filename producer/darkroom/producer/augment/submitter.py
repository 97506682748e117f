"""Submitting a run's jobs with a bounded number in flight, and following them through their events.

The run subscribes once to ``darkroom:events`` (every job's events; see ``jobstore``) before it sends
anything, so no event of its jobs can be missed, and counts the terminal events of the jobs it has in
flight (others are skipped without being parsed). Jobs go out in batches of up to 500, one round trip each,
whenever the window has room: each job is created in one atomic script, or, when the plan found a record of
its id, replaces that job if it failed or was cancelled (``jobstore.stage_create(..., resubmit=True)``); a
job of that id that is still queued or running (a previous run's, or a concurrent one's) is followed, not
sent again, and one that succeeded is counted done. A terminal event frees a place in the window. After 5 s without news the records of the jobs in
flight are read once (one MGET), in case pub/sub lost a message across a reconnect. A lost connection (a
Sentinel failover, a Redis restart) is survived for up to 30 s of outage (``jobstore.Outage``): the run
subscribes again, reads the records of its jobs in flight, and sends a batch whose round trip failed again
(a job of it that was created already is then found and followed, not created twice).

Progress is reported to a callback (the CLI's bar) and to Redis for dashboards
(:mod:`darkroom.common.augment_keys`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from darkroom.common.augment_keys import AUGMENT_RUNS_KEY, RunState, augment_run_key
from darkroom.common.events import ALL_EVENTS_CHANNEL, JobEvent
from darkroom.common.jobs import Img2ImgJob
from darkroom.common.jobstore import Outage, job_key, refused_status
from darkroom.common.status import JobStatus

from .._durable import REDIS_DOWN, reconnect_or_raise
from .._submission import Stager

__all__ = ["Progress", "RunBoard", "Submitter"]

RECHECK_SECONDS = 5.0
_TERMINAL_MARKS = tuple(f'"status":"{s.value}"'.encode() for s in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                    JobStatus.CANCELLED))
_TICK = 0.25
_RATE_WINDOW = 60.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """A run's counts now. ``done`` includes cells finished by earlier runs; ``failed`` counts cancelled ones."""

    total: int
    done: int
    failed: int
    in_flight: int
    waiting: int
    submitted: int
    elapsed: float
    rate: float
    state: RunState = RunState.RUNNING

    @property
    def eta_seconds(self) -> float | None:
        left = self.waiting + self.in_flight
        return left / self.rate if self.rate > 0 else (0.0 if not left else None)


class RunBoard:
    """The run's live counts in Redis, for dashboards: a hash per run and a sorted set of runs."""

    def __init__(self, redis: Any, run_id: str, *, output_prefix: str, model: str, ttl: int,
                 interval: float = 1.0, clock: Callable[[], float] = time.time) -> None:
        self.redis, self.run_id, self.ttl, self.interval, self.clock = redis, run_id, ttl, interval, clock
        self.key = augment_run_key(run_id)
        self.static = {"run_id": run_id, "output_prefix": output_prefix, "model": model}
        self._last = 0.0

    def start(self, progress: Progress) -> None:
        now = self.clock()
        pipe = self.redis.pipeline(transaction=True)
        pipe.hsetnx(self.key, "started_at", f"{now:.3f}")  # a resumed run keeps its first start
        pipe.zadd(AUGMENT_RUNS_KEY, {self.run_id: now}, nx=True)
        pipe.zremrangebyscore(AUGMENT_RUNS_KEY, "-inf", now - self.ttl)
        pipe.execute()
        self.update(progress, force=True)

    def update(self, progress: Progress, *, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        fields = {**self.static, "total": progress.total, "done": progress.done, "failed": progress.failed,
                  "in_flight": progress.in_flight, "state": progress.state.value, "updated_at": f"{now:.3f}"}
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.key, mapping=fields)
        pipe.expire(self.key, self.ttl)
        pipe.execute()


class Submitter:
    """Sends ``jobs`` (already prepared) with at most ``window`` in flight, until all ended or ``stop`` is set."""

    def __init__(self, redis: Any, stager: Stager, queue_for: Callable[[str], str], jobs: Sequence[Img2ImgJob], *,
                 total: int, done: int, failed: int = 0, window: int, chunk: int = 500,
                 recorded: Collection[str] = (), stop: threading.Event | None = None,
                 on_progress: Callable[[Progress], None] | None = None, board: RunBoard | None = None) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, not {window}")
        self.redis, self.stager, self.queue_for = redis, stager, queue_for
        self.waiting: deque[Img2ImgJob] = deque(jobs)
        self.window, self.chunk = window, max(1, chunk)
        self.recorded = frozenset(recorded)  # ids that had a record when planned: resubmitted, if they ended badly
        self.stop = stop or threading.Event()
        self.on_progress, self.board = on_progress, board
        self.in_flight: set[str] = set()
        self.outcomes: dict[str, JobStatus] = {}
        self._counts = {"total": total, "done": done, "failed": failed, "submitted": 0}
        self._finished: deque[float] = deque()
        self._started = time.monotonic()
        self._last_tick = 0.0

    # -- the loop --------------------------------------------------------------
    def run(self) -> bool:
        """Submit and follow; True once every job ended, False when stopped first (jobs sent keep running)."""
        if self.board is not None:
            self.board.start(self.progress())
        finished, outage, pubsub = False, Outage(), None
        try:
            while True:
                try:
                    if pubsub is None:
                        pubsub = self.redis.pubsub()
                        _subscribe(pubsub, ALL_EVENTS_CHANNEL)  # before a job is sent: no event can be missed
                        self._recheck()  # after a lost connection: what ended while nobody listened
                    finished = self._loop(pubsub, outage)
                    return finished
                except REDIS_DOWN as exc:
                    reconnect_or_raise(exc, outage, "follow the run's jobs")
                    log.warning("augmentation run: Redis connection lost (%s); subscribing again", exc)
                    if pubsub is not None:
                        pubsub.close()
                    pubsub = None
                    time.sleep(Outage.PAUSE_SECONDS)
        finally:
            self._tick(force=True, state=RunState.FINISHED if finished else RunState.STOPPED)
            if pubsub is not None:
                pubsub.close()

    def _loop(self, pubsub: Any, outage: Outage) -> bool:
        last_news = time.monotonic()
        while not self.stop.is_set():
            outage.over()
            if self.waiting and len(self.in_flight) < self.window:
                self._send()
                self._drain(pubsub)
                self._tick()
                continue  # more to send while the window has room
            if not self.in_flight and not self.waiting:
                return True
            if self._on_message(pubsub.get_message(timeout=_TICK)):
                last_news = time.monotonic()
            elif time.monotonic() - last_news >= RECHECK_SECONDS:
                last_news = time.monotonic()
                self._recheck()
            self._tick()
        return False

    def _send(self) -> None:
        """Create (or resubmit) the next batch in one round trip; follow what is still live.

        ``stop`` is read again here, right before staging: a stop that arrives while a batch is being
        sent lets that batch finish (and be counted in flight), and no batch starts after it.
        """
        if self.stop.is_set():
            return
        room = self.window - len(self.in_flight)
        batch = [self.waiting.popleft() for _ in range(min(room, self.chunk, len(self.waiting)))]
        pipe = self.redis.pipeline(transaction=False)
        for job in batch:
            self.stager.stage(pipe, job, self.queue_for(job.model), resubmit=job.job_id in self.recorded)
        try:
            replies = pipe.execute()
        except REDIS_DOWN:  # sent again after reconnecting; jobs this round trip did create are then followed
            self.waiting.extendleft(reversed(batch))
            raise
        for job, reply in zip(batch, replies, strict=True):
            status = refused_status(reply)
            if status is None:
                self._counts["submitted"] += 1
            if status is None or not status.is_terminal:
                self.in_flight.add(job.job_id or "")
            else:  # succeeded meanwhile (another run of the same grid)
                self.outcomes[job.job_id or ""] = status
                self._counts["done"] += 1

    def _drain(self, pubsub: Any) -> None:
        """Read what has arrived (the batch's own ``queued`` events) so the subscription's buffer stays small."""
        while (message := pubsub.get_message(timeout=0)) is not None:
            self._on_message(message)

    def _on_message(self, message: dict[str, Any] | None) -> bool:
        """Count a terminal event of a job in flight; True when it was one. Other events are skipped unparsed."""
        if message is not None and message.get("type") == "subscribe":  # redis-py reconnected by itself:
            self._recheck()  # what ended while the old connection was gone is read now, not after 5 s of silence
            return False
        if message is None or message.get("type") != "message":
            return False
        data = message["data"]
        if not any(mark in data for mark in _TERMINAL_MARKS):
            return False
        event = JobEvent.model_validate_json(data)
        if event.status.is_terminal and event.job_id in self.in_flight:
            self._ended(event.job_id, event.status)
            return True
        return False

    def _ended(self, job_id: str, status: JobStatus) -> None:
        self.in_flight.discard(job_id)
        self.outcomes[job_id] = status
        self._counts["done" if status is JobStatus.SUCCEEDED else "failed"] += 1
        self._finished.append(time.monotonic())

    def _recheck(self) -> None:
        """Read the records of the jobs in flight (a lost pub/sub message must not stall the run)."""
        ids = sorted(self.in_flight)
        for start in range(0, len(ids), 1000):
            part = ids[start:start + 1000]
            for job_id, raw in zip(part, self.redis.mget([job_key(i) for i in part]), strict=True):
                if raw is not None and (status := JobStatus(_status_of(raw))).is_terminal:
                    self._ended(job_id, status)

    # -- progress -------------------------------------------------------------------
    def progress(self, state: RunState = RunState.RUNNING) -> Progress:
        now = time.monotonic()
        while self._finished and now - self._finished[0] > _RATE_WINDOW:
            self._finished.popleft()
        span = min(_RATE_WINDOW, now - self._started)
        rate = len(self._finished) / span if span > 0 else 0.0
        c = self._counts
        return Progress(total=c["total"], done=c["done"], failed=c["failed"], in_flight=len(self.in_flight),
                        waiting=len(self.waiting), submitted=c["submitted"],
                        elapsed=now - self._started, rate=rate, state=state)

    def _tick(self, *, force: bool = False, state: RunState = RunState.RUNNING) -> None:
        now = time.monotonic()
        if not force and now - self._last_tick < _TICK:
            return
        self._last_tick = now
        progress = self.progress(state)
        if self.on_progress is not None:
            self.on_progress(progress)
        if self.board is not None:
            self.board.update(progress, force=force)


def _subscribe(pubsub: Any, channel: str, timeout: float = 30.0) -> None:
    """Subscribe and wait until Redis confirms it."""
    pubsub.subscribe(channel)
    deadline = time.monotonic() + timeout
    while (message := pubsub.get_message(timeout=1.0)) is None or message["type"] != "subscribe":
        if time.monotonic() > deadline:
            raise TimeoutError(f"Redis did not confirm the subscription to {channel}")


def _status_of(raw: bytes | str) -> str:
    return str(json.loads(raw)["status"])
