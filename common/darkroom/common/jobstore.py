"""Job status in Redis: one JSON record per job, changed only by legal transitions.

Keys (all expire after ``Settings.status_ttl_seconds``)::

    darkroom:job:{job_id}            JobRecord as JSON
    darkroom:job:{job_id}:progress   last progress event as JSON (best effort)
    darkroom:job:{job_id}:cancel     present once the job was cancelled (the worker checks it)
    darkroom:job:{job_id}:history    deliveries and outcomes, newest 50 (JSON lines)
    darkroom:job:{job_id}:history:previous   the history before the job was last resubmitted
    darkroom:dead-letters            hash job_id -> job, reason and history of jobs that kept coming back
    darkroom:jobs                    sorted set of job ids scored by submission time (Redis clock), for listings
                                     (dashboard); written with each record, entries older than the TTL trimmed

Every transition also publishes a :class:`JobEvent` on ``darkroom:events:{job_id}``
and on ``darkroom:events``, so waiters wake at once instead of polling.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict

from .errors import ErrorCode, FieldError, InvalidJobError, JobCancelled, JobFailed, WaitTimeout
from .events import ALL_EVENTS_CHANNEL, EventType, JobEvent, event_channel
from .jobs import Img2ImgJob
from .results import FailureDetails, JobResult
from .status import IllegalTransition, JobStatus
from .webhooks import outbox_push

__all__ = ["JobRecord", "JobStore", "JobNotFound", "job_key", "cancel_key", "DEAD_LETTERS_KEY", "stage_create",
           "raise_taken", "advance", "stage_write", "CREATED", "RESUBMITTED", "refused_status"]


def job_key(job_id: str) -> str:
    return f"darkroom:job:{job_id}"


DEAD_LETTERS_KEY = "darkroom:dead-letters"
JOBS_INDEX_KEY = "darkroom:jobs"


def cancel_key(job_id: str) -> str:
    return f"darkroom:job:{job_id}:cancel"


def _now() -> datetime:
    return datetime.now(UTC)


class JobNotFound(KeyError):
    """Raised when no status record exists for a job id (never submitted, or expired)."""


class JobRecord(BaseModel):
    """Everything known about a job right now."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str
    status: JobStatus
    job: Img2ImgJob
    created_at: datetime
    updated_at: datetime
    attempt: int = 0
    worker: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    details: FailureDetails | None = None
    result: JobResult | None = None

    def raise_for_outcome(self) -> JobResult:
        """Return the result of a succeeded job, or raise what its ending means."""
        if self.status is JobStatus.SUCCEEDED and self.result is not None:
            return self.result
        if self.status is JobStatus.CANCELLED:
            raise JobCancelled(self.job_id, self.error_code, self.error_message or "cancelled")
        if self.status is JobStatus.FAILED:
            details = self.details.model_dump(mode="json") if self.details is not None else {}
            raise JobFailed(self.job_id, self.error_code, self.error_message or "failed", details)
        raise WaitTimeout(self.job_id, None, f"job is {self.status.value}, not finished")

    def as_event(self, type_: EventType | None = None, *, time: datetime | None = None, **extra: Any) -> JobEvent:
        """The event of this record's latest change (at ``updated_at`` unless ``time``), or ``type_`` with ``extra``."""
        return JobEvent(
            type=type_ or EventType.for_status(self.status),
            job_id=self.job_id,
            status=self.status,
            time=time or self.updated_at,
            attempt=self.attempt,
            worker=self.worker,
            error_code=self.error_code,
            error_message=self.error_message,
            **extra,
        )


class JobStore:
    """Reads and changes job records; the single writer of the key layout above."""

    def __init__(self, client: redis.Redis, *, ttl_seconds: int = 7 * 24 * 3600) -> None:
        self.redis = client
        self.ttl = ttl_seconds

    # -- reads -----------------------------------------------------------
    def get(self, job_id: str) -> JobRecord | None:
        raw = self.redis.get(job_key(job_id))
        return None if raw is None else JobRecord.model_validate_json(raw)

    def require(self, job_id: str) -> JobRecord:
        record = self.get(job_id)
        if record is None:
            raise JobNotFound(job_id)
        return record

    def progress(self, job_id: str) -> JobEvent | None:
        raw = self.redis.get(job_key(job_id) + ":progress")
        return None if raw is None else JobEvent.model_validate_json(raw)

    def recent(self, *, since: float | None = None, until: float | None = None, offset: int = 0,
               count: int = 100) -> list[tuple[str, float]]:
        """Ids of jobs submitted between ``since`` and ``until`` (epoch seconds), newest first, with the time."""
        found: list[tuple[bytes, float]] = self.redis.zrevrangebyscore(  # type: ignore[assignment]
            JOBS_INDEX_KEY, "+inf" if until is None else until, "-inf" if since is None else since,
            start=offset, num=count, withscores=True)
        return [(k.decode() if isinstance(k, bytes) else str(k), float(score)) for k, score in found]

    def get_many(self, job_ids: list[str]) -> list[JobRecord | None]:
        """The records of ``job_ids`` in one round trip (None where a record expired)."""
        raws = self.redis.mget([job_key(j) for j in job_ids]) if job_ids else []
        return [None if raw is None else JobRecord.model_validate_json(raw) for raw in raws]

    # -- writes ----------------------------------------------------------
    def create(
        self, job: Img2ImgJob, pipe: Any | None = None, *, enqueue: tuple[str, str | bytes] | None = None
    ) -> JobRecord:
        """Record a new ``queued`` job and publish its event; see :func:`stage_create` for ``pipe`` and ``enqueue``.

        Without ``pipe`` it runs at once and raises InvalidJobError when the id is taken.
        """
        if pipe is not None:
            return stage_create(pipe, job, self.ttl, enqueue=enqueue)
        pipe = self.redis.pipeline(transaction=False)
        record = stage_create(pipe, job, self.ttl, enqueue=enqueue)
        if not pipe.execute()[0]:
            raise_taken([(None, record.job_id)])
        return record

    def transition(
        self,
        job_id: str,
        status: JobStatus,
        *,
        job: Img2ImgJob | None = None,
        **changes: Any,
    ) -> JobRecord:
        """Move a job to ``status`` (asserting the move is legal) and publish the event.

        ``job`` creates the record if it is missing (e.g. it expired while queued).
        Raises :class:`~darkroom.common.status.IllegalTransition` for illegal moves.
        """
        key = job_key(job_id)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)  # type: ignore[no-untyped-call]
                    record = advance(pipe.get(key), job_id, status, job=job, changes=changes)
                    pipe.multi()
                    stage_write(pipe, record, self.ttl)
                    pipe.execute()
                    return record
                except redis.WatchError:
                    continue

    def report_progress(self, record: JobRecord, step: int, total_steps: int) -> bool:
        """Best-effort progress: stored for late readers and published. Returns whether the job was cancelled."""
        event = self._event(record, EventType.PROGRESS, step=step, total_steps=total_steps)
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(job_key(record.job_id) + ":progress", event.model_dump_json(), ex=self.ttl)
        self._publish(pipe, record, event)
        pipe.exists(cancel_key(record.job_id))
        return bool(pipe.execute()[-1])

    # -- cancelling --------------------------------------------------------
    def cancel(self, job_id: str, reason: str = "cancelled on request") -> JobRecord:
        """Cancel a job: a queued one will never run; a running one stops at its next denoising step.

        Sets a flag the worker checks while it denoises, then moves the record to ``cancelled``.
        A job that already ended is left as it is (its record is returned).
        """
        self.redis.set(cancel_key(job_id), reason, ex=self.ttl)
        try:
            return self.transition(job_id, JobStatus.CANCELLED, error_code="cancelled", error_message=reason)
        except IllegalTransition:
            return self.require(job_id)

    def is_cancelled(self, job_id: str) -> bool:
        return bool(self.redis.exists(cancel_key(job_id)))

    # -- history and dead letters -------------------------------------------
    def note(self, job_id: str, event: str, **details: Any) -> None:
        """Append to the job's delivery history (kept with the record; the newest 50 entries)."""
        entry = json.dumps({"event": event, "time": _now().isoformat(), **details}, default=str)
        key = job_key(job_id) + ":history"
        pipe = self.redis.pipeline(transaction=False)
        pipe.rpush(key, entry)
        pipe.ltrim(key, -50, -1)
        pipe.expire(key, self.ttl)
        pipe.execute()

    def last_note(self, job_id: str) -> dict[str, Any] | None:
        raw = self.redis.lrange(job_key(job_id) + ":history", -1, -1)
        return json.loads(raw[0]) if raw else None

    def history(self, job_id: str) -> list[dict[str, Any]]:
        return [json.loads(raw) for raw in self.redis.lrange(job_key(job_id) + ":history", 0, -1)]

    def dead_letter(self, job: Img2ImgJob, reason: str) -> JobRecord:
        """Fail a job that keeps coming back, keeping it and its history in the dead-letter store."""
        assert job.job_id is not None
        entry = {"job": job.model_dump(mode="json"), "reason": reason, "time": _now().isoformat(),
                 "history": self.history(job.job_id)}
        self.redis.hset(DEAD_LETTERS_KEY, job.job_id, json.dumps(entry))
        return self.transition(job.job_id, JobStatus.FAILED, job=job, error_code=ErrorCode.DELIVERY_LIMIT.value,
                               error_message=f"moved to the dead-letter queue: {reason}")

    def dead_letters(self) -> dict[str, dict[str, Any]]:
        raw = self.redis.hgetall(DEAD_LETTERS_KEY)
        return {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in raw.items()}

    # -- waiting ---------------------------------------------------------
    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        on_event: Callable[[JobEvent], None] | None = None,
    ) -> JobRecord:
        """Block until the job is terminal; wake on its events (no polling loop).

        Subscribes before reading the record, so an event published in between
        is not missed. Re-reads the record every few seconds in case pub/sub lost
        a message across a reconnect. Raises :class:`WaitTimeout`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        pubsub.subscribe(event_channel(job_id))
        try:
            record = self.require(job_id)
            while not record.status.is_terminal:
                remaining = 5.0 if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    raise WaitTimeout(job_id, None, f"still {record.status.value} after {timeout} s")
                message = pubsub.get_message(timeout=min(remaining, 5.0))
                if message is None:
                    record = self.require(job_id)
                    continue
                event = JobEvent.model_validate_json(message["data"])
                if on_event is not None:
                    on_event(event)
                if event.type is not EventType.PROGRESS:
                    record = self.require(job_id)
            return record
        finally:
            pubsub.close()

    # -- helpers ---------------------------------------------------------
    @staticmethod
    def _event(record: JobRecord, type_: EventType | None = None, **extra: Any) -> JobEvent:
        return record.as_event(type_, time=_now(), **extra)

    @staticmethod
    def _publish(pipe: Any, record: JobRecord, event: JobEvent) -> None:
        """Publish the event to waiters and queue its webhook, in the caller's transaction."""
        data = event.model_dump_json()
        pipe.publish(event_channel(event.job_id), data)
        pipe.publish(ALL_EVENTS_CHANNEL, data)
        outbox_push(pipe, record, event)


# -- building blocks for pipelines (sync or asyncio) ----------------------------
# Records a job only if its id is free, and only then runs what goes with it (its events, its webhook,
# its broker message): all or nothing, in one step. KEYS[1] record key; ARGV[1] record JSON, ARGV[2] TTL,
# then (command, key or channel, value) triples, each PUBLISH or LPUSH. The last key is JOBS_INDEX_KEY.
# Both scripts index the job they write by the Redis clock (_INDEX_JOB) and trim entries older than the TTL.
_INDEX_JOB = """
local now = redis.call('TIME')
redis.call('ZADD', KEYS[#KEYS], now[1] + now[2] / 1000000, string.sub(KEYS[1], 14))
redis.call('ZREMRANGEBYSCORE', KEYS[#KEYS], '-inf', now[1] - ARGV[2])
"""
_CREATE = """
if not redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2], 'NX') then return 0 end
""" + _INDEX_JOB + """
for i = 3, #ARGV, 3 do redis.call(ARGV[i], ARGV[i + 1], ARGV[i + 2]) end
return 1
"""

# The same for a job that may be submitted again: a free id is created (reply 1); a record that ended
# failed or cancelled is replaced (reply 2): its cancel flag and last progress go, its history moves to
# :history:previous and the new one starts with a "resubmitted" note. Any other record is left as it is
# and its status is the reply. KEYS: record, cancel flag, progress, history, previous history, jobs index.
# ARGV[1] record JSON, ARGV[2] TTL, ARGV[3] time of the note, then the triples as above.
_RESUBMIT = """
local current = redis.call('GET', KEYS[1])
local reply = 1
if current then
  local old = cjson.decode(current)
  if old['status'] ~= 'failed' and old['status'] ~= 'cancelled' then return old['status'] end
  redis.call('DEL', KEYS[2], KEYS[3])
  if redis.call('EXISTS', KEYS[4]) == 1 then
    redis.call('RENAME', KEYS[4], KEYS[5])
    redis.call('EXPIRE', KEYS[5], ARGV[2])
  end
  redis.call('RPUSH', KEYS[4], cjson.encode({event = 'resubmitted', time = ARGV[3], previous_status = old['status'],
    previous_error_code = old['error_code'], previous_attempt = old['attempt']}))
  redis.call('EXPIRE', KEYS[4], ARGV[2])
  reply = 2
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
""" + _INDEX_JOB + """
for i = 4, #ARGV, 3 do redis.call(ARGV[i], ARGV[i + 1], ARGV[i + 2]) end
return reply
"""
CREATED, RESUBMITTED = 1, 2
"""Replies of a staged create: the id was free, or a failed/cancelled job of that id was replaced."""


def refused_status(reply: Any) -> JobStatus | None:
    """The status of the job that a staged create left in place (its id was taken), or None if it wrote."""
    if reply in (CREATED, RESUBMITTED):
        return None
    if isinstance(reply, (bytes, str)) and reply:
        return JobStatus(reply.decode() if isinstance(reply, bytes) else reply)
    return JobStatus.QUEUED  # a plain create answers 0 without saying what holds the id


class _Deferred:
    """Takes a pipeline's place while a create is staged: collects its PUBLISH/LPUSH for the script above."""

    def __init__(self) -> None:
        self.args: list[str | bytes] = []

    def publish(self, channel: str, data: str | bytes) -> None:
        self.args += ["PUBLISH", channel, data]

    def lpush(self, key: str, value: str | bytes) -> None:
        self.args += ["LPUSH", key, value]


def stage_create(
    pipe: Any, job: Img2ImgJob, ttl: int, *, enqueue: tuple[str, str | bytes] | None = None, resubmit: bool = False
) -> JobRecord:
    """Add the creation of ``job``'s ``queued`` record to ``pipe`` (a sync or asyncio pipeline).

    With it go the ``queued`` event, the webhook and, with ``enqueue=(list key, message)``, an LPUSH of
    the job's broker message, all only if the id is free, in one script: a message never exists without
    its record, and a taken id changes nothing. The pipeline's reply for it is 1, or 0 if the id was taken.

    With ``resubmit`` a job of that id that ended failed or cancelled is replaced in the same atomic step
    (reply :data:`RESUBMITTED`; see ``_RESUBMIT``), and a job in any other state is left alone (the reply is
    its status: :func:`refused_status` reads it).
    """
    assert job.job_id is not None
    now = _now()
    record = JobRecord(job_id=job.job_id, status=JobStatus.QUEUED, job=job, created_at=now, updated_at=now)
    deferred = _Deferred()
    JobStore._publish(deferred, record, JobStore._event(record))
    if enqueue is not None:
        deferred.lpush(*enqueue)
    key = job_key(job.job_id)
    if resubmit:
        keys = (key, cancel_key(job.job_id), key + ":progress", key + ":history", key + ":history:previous", JOBS_INDEX_KEY)
        pipe.eval(_RESUBMIT, len(keys), *keys, record.model_dump_json(), ttl, now.isoformat(), *deferred.args)
    else:
        pipe.eval(_CREATE, 2, key, JOBS_INDEX_KEY, record.model_dump_json(), ttl, *deferred.args)
    return record


def raise_taken(taken: list[tuple[int | None, str]], reason: str = "already exists; choose another id or omit it") -> None:
    """Raise InvalidJobError for job ids that already exist, as (index in the batch or None, id) pairs."""
    if taken:
        raise InvalidJobError([
            FieldError("job_id" if index is None else f"jobs[{index}].job_id", job_id, reason)
            for index, job_id in taken
        ])


def advance(
    raw: bytes | str | None, job_id: str, status: JobStatus, *, job: Img2ImgJob | None, changes: dict[str, Any]
) -> JobRecord:
    """The record after moving the stored one (``raw``; made from ``job`` when missing) to ``status``.

    Raises JobNotFound, or IllegalTransition for an illegal move.
    """
    now = _now()
    if raw is None:
        if job is None:
            raise JobNotFound(job_id)
        current = JobRecord(job_id=job_id, status=JobStatus.QUEUED, job=job, created_at=now, updated_at=now)
    else:
        current = JobRecord.model_validate_json(raw)
    current.status.assert_can_become(status)
    record = current.model_copy(update={**changes, "status": status, "updated_at": now})
    return JobRecord.model_validate(record.model_dump())


def stage_write(pipe: Any, record: JobRecord, ttl: int) -> None:
    """Add writing ``record`` and publishing its event to ``pipe`` (inside the caller's MULTI)."""
    pipe.set(job_key(record.job_id), record.model_dump_json(), ex=ttl)
    JobStore._publish(pipe, record, JobStore._event(record))
