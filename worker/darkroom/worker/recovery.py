"""Bringing back jobs whose message is gone or stuck with a dead worker (:class:`Rescue`, on its own thread).

**Orphaned hot queues.** Jobs routed to a model's hot queue when the workers holding it resident have
gone: moved to the model's cold queue (:func:`~.routing.sweep_orphaned_queues`).

**Abandoned messages.** kombu's Redis transport keeps every delivered, unacknowledged message in
the hash ``unacked`` with its delivery time in ``unacked_index``, and restores one only after the
visibility timeout (which must exceed the longest job: an hour by default). Jobs hold a lease while
they run, so a message out longer than a lease lifetime whose job holds no lease belongs to a
worker that died: :func:`reclaim_abandoned` pushes it back now, as kombu would.

**Lost messages.** A job can also be ``queued`` or ``started`` with no message anywhere: lost in
kombu's window between BRPOP and the unacked write when a worker is SIGKILLed, or in the last second
before a Redis crash under ``appendfsync everysec``. :class:`Reconciler` (one at a time across the
fleet and interval: a sweep is claimed atomically when the fleet's last one began at least this
worker's interval ago) takes open jobs unchanged for a grace period, with no lease and no message in
any queue or in ``unacked``, and enqueues a fresh message for each. That is safe by construction:
a duplicate delivery finds the lease or the ended record, and the fence keeps results single.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

import redis

from darkroom.common.broker import (
    QUEUE_LIST_PATTERN,
    UNACKED,
    UNACKED_INDEX,
    origin,
    queued_task_id,
    restored,
    task_message,
)
from darkroom.common.fleet import Fleet
from darkroom.common.jobs import MESSAGE_SCHEMA_VERSION
from darkroom.common.jobstore import OPEN_JOBS_KEY, RECONCILER_LAST, JobRecord, UnreadableRecord
from darkroom.common.lifecycle import Lifecycle, lease_key
from darkroom.common.queues import TASK_IMG2IMG

from .routing import sweep_orphaned_queues

if TYPE_CHECKING:
    from .context import WorkerContext

__all__ = ["reclaim_abandoned", "Reconciler", "Rescue", "RescueReport", "RECONCILER_LAST"]

# Claim the fleet's next sweep: when the last one began at least ARGV[1] ms ago (Redis's clock), mark
# this one. A lock held for the taker's interval would let a worker with a long interval hold off
# one configured with a short one (a rolling change of the setting, or mixed pools) for its whole
# interval; the mark lets each worker sweep once its own interval has passed since anyone's sweep.
_CLAIM_SWEEP = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local last = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if now_ms - last < tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], now_ms, 'PX', ARGV[2])
return 1
"""

log = logging.getLogger(__name__)



def reclaim_abandoned(client: redis.Redis, *, older_than: float, limit: int = 100) -> list[str]:
    """Requeue messages delivered more than ``older_than`` seconds ago whose job holds no lease.

    Returns the job ids requeued. Safe to run from every worker at once (each restore is a transaction).
    """
    ceiling = time.time() - older_than
    requeued = []
    tags: list[bytes] = client.zrangebyscore(UNACKED_INDEX, 0, ceiling, start=0, num=limit)  # type: ignore[assignment]
    for tag in tags:
        job_id = _restore_if_abandoned(client, tag)
        if job_id:
            requeued.append(job_id)
    if requeued:
        log.warning("requeued %d job(s) of dead workers: %s", len(requeued), ", ".join(requeued))
    return requeued


def _restore_if_abandoned(client: redis.Redis, tag: bytes | str) -> str | None:
    with client.pipeline() as pipe:
        try:
            pipe.watch(UNACKED)  # type: ignore[no-untyped-call]
            raw = pipe.hget(UNACKED, tag)
            if raw is None:  # acked meanwhile, or restored by another worker
                pipe.multi()
                pipe.zrem(UNACKED_INDEX, tag)
                pipe.execute()
                return None
            job_id = queued_task_id(raw, unacked=True)
            restore = restored(raw)
            if job_id is None or restore is None or pipe.exists(lease_key(job_id)):
                pipe.unwatch()
                return None
            pipe.multi()
            pipe.zrem(UNACKED_INDEX, tag)
            pipe.hdel(UNACKED, tag)
            pipe.rpush(*restore)
            pipe.execute()
            return job_id
        except redis.WatchError:
            return None


class Reconciler:
    """Enqueues again the open jobs whose message is gone (see the module's docstring)."""

    def __init__(self, client: redis.Redis, lifecycle: Lifecycle, *, grace_seconds: float, interval_seconds: float,
                 owner: str, limit: int = 500) -> None:
        self.redis = client
        self.lifecycle = lifecycle
        self.grace = grace_seconds
        self.interval = interval_seconds
        self.owner = owner
        self.limit = limit
        self._next = 0.0
        self._claim = client.register_script(_CLAIM_SWEEP)

    def due(self, now: float) -> bool:
        return now >= self._next

    def run_once(self, now: float | None = None) -> list[str]:
        """One sweep if the fleet's last began at least this interval ago (else nothing); the job ids enqueued again."""
        now = time.time() if now is None else now
        self._next = now + self.interval
        interval_ms = max(1, int(self.interval * 1000))
        if not self._claim(keys=[RECONCILER_LAST], args=[interval_ms, max(interval_ms, 86_400_000)]):
            return []
        candidates = self._stale_open_jobs()
        if not candidates:
            return []
        present = self._jobs_with_messages(set(candidates))
        requeued = []
        for job_id in candidates:
            if job_id in present or self.redis.exists(lease_key(job_id)):
                self.redis.zadd(OPEN_JOBS_KEY, {job_id: time.time()})  # fine: look again after another grace
                continue
            if self._enqueue(job_id):
                requeued.append(job_id)
        if requeued:
            log.warning("reconciler %s: enqueued %d job(s) whose message was lost: %s", self.owner, len(requeued),
                        ", ".join(requeued[:20]))
        return requeued

    def _stale_open_jobs(self) -> list[str]:
        # the index is scored by Redis's clock; compare with it, not this host's
        seconds, micros = self.redis.time()
        ceiling = seconds + micros / 1e6 - self.grace
        found = self.redis.zrangebyscore(OPEN_JOBS_KEY, "-inf", ceiling, start=0, num=self.limit)
        return [f.decode() if isinstance(f, bytes) else str(f) for f in found]

    def _jobs_with_messages(self, wanted: set[str]) -> set[str]:
        """Which of ``wanted`` have a message in some queue list or in kombu's unacked hash."""
        found: set[str] = set()
        for key in self.redis.scan_iter(match=QUEUE_LIST_PATTERN, count=1000):
            if self.redis.type(key) not in (b"list", "list"):
                continue
            for start in range(0, int(self.redis.llen(key)), 1000):
                found |= _named(self.redis.lrange(key, start, start + 999), wanted)
        found |= _named(self.redis.hvals(UNACKED), wanted, unacked=True)
        return found

    def _enqueue(self, job_id: str) -> bool:
        try:
            record = self.lifecycle.read(job_id)
        except UnreadableRecord:
            return False
        if record is None or record.status.is_terminal or record.job is None:
            self.redis.zrem(OPEN_JOBS_KEY, job_id)
            return False
        if not self.lifecycle.reconciled(record):  # changed since it was read: not lost
            return False
        queue, message = _message(record, Fleet(self.redis).queue_for(record.job.model))
        self.redis.lpush(queue, message)
        return True


# A task message's id as its headers carry it (``"id":"…"``; kombu writes ``"id": "…"``). The body is base64, so
# nothing a producer wrote matches; a match only selects the messages worth parsing.
_HEADER_ID = re.compile(rb'"id": ?"([^"\\]{1,256})"')


def _named(raws: Iterable[Any], wanted: set[str], *, unacked: bool = False) -> set[str]:
    """Which of ``wanted`` these raw messages carry: one regex pass per message, whatever the number wanted
    (a substring test per wanted id made a sweep of 500 candidates over a 20,000-job backlog take 4.3 s)."""
    keys = {job_id.encode() for job_id in wanted}
    found = set()
    for raw in raws:
        data = raw if isinstance(raw, bytes) else str(raw).encode()
        if keys.isdisjoint(_HEADER_ID.findall(data)):
            continue
        job_id = queued_task_id(data, unacked=unacked)
        if job_id in wanted:
            found.add(job_id)
    return found


def _message(record: JobRecord, queue: str) -> tuple[str, bytes]:
    assert record.job is not None
    payload = {**record.job.model_dump(mode="json"), "schema_version": MESSAGE_SCHEMA_VERSION}
    return task_message(TASK_IMG2IMG, record.job_id, [payload], queue=queue,
                        priority=record.job.priority.broker_priority, sender=origin())


class RescueReport(NamedTuple):
    moved: int  # messages moved from orphaned hot queues to cold ones
    reclaimed: list[str]  # jobs of dead workers' unacknowledged messages, requeued
    reconciled: list[str]  # open jobs whose message was lost, enqueued again


class Rescue:
    """Every way jobs come back, in one sweep (a thread beside the heartbeat runs it): orphaned hot queues, dead
    workers' unacknowledged messages, then (when due, one worker at a time) lost messages."""

    def __init__(self, client: redis.Redis, reconciler: Reconciler, *, model_ids: list[str],
                 abandoned_after: float) -> None:
        self.redis = client
        self.reconciler = reconciler
        self.model_ids = model_ids
        self.abandoned_after = abandoned_after

    @classmethod
    def for_worker(cls, ctx: WorkerContext) -> Rescue:
        s = ctx.settings
        reconciler = Reconciler(ctx.redis, ctx.lifecycle, grace_seconds=s.reconcile_grace_seconds,
                                interval_seconds=s.reconcile_interval_seconds, owner=ctx.name)
        return cls(ctx.redis, reconciler, model_ids=ctx.models.registry.ids, abandoned_after=s.lease_seconds * 1.5)

    def run_once(self) -> RescueReport:
        moved = sweep_orphaned_queues(self.redis, Fleet(self.redis, ttl=0), self.model_ids)
        reclaimed = reclaim_abandoned(self.redis, older_than=self.abandoned_after)
        reconciled = self.reconciler.run_once() if self.reconciler.due(time.time()) else []
        return RescueReport(moved, reclaimed, reconciled)
