"""Job status in Redis: one JSON record per job, changed only by legal transitions.

Keys (all expire after ``Settings.status_ttl_seconds``)::

    darkroom:job:{job_id}            JobRecord as JSON (``schema_version``; readers ignore unknown fields)
    darkroom:job:{job_id}:progress   last progress event as JSON (best effort)
    darkroom:job:{job_id}:cancel     present while a live job is being cancelled (the worker checks it);
                                     set only for a queued or started job, cleared when a job is created
    darkroom:job:{job_id}:history    deliveries and outcomes for people, newest 50 (JSON lines)
    darkroom:job:{job_id}:history:previous   the history before the job was last resubmitted
    darkroom:jobs                    sorted set of job ids scored by submission time (Redis clock), for listings
                                     (dashboard); written with each record, entries older than the TTL trimmed
    darkroom:jobs:open               sorted set of queued/started job ids scored by their last change (Redis
                                     clock): what the reconciler checks; terminal jobs leave it

Not expiring, but bounded (retention and count settings; see :mod:`.lifecycle`)::

    darkroom:dead-letters            hash id -> job (or raw message), reason and history
    darkroom:dead-letters:index      sorted set id -> when it was dead-lettered (for trimming)

Creation lives here; every later change of a record (cancelling included) is :mod:`.lifecycle`'s.

Every transition also publishes a :class:`JobEvent` on ``darkroom:events:{job_id}``
and on ``darkroom:events``, so waiters wake at once instead of polling.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from .errors import DarkroomError, FieldError, InvalidJobError, JobCancelled, JobFailed, WaitTimeout
from .events import ALL_EVENTS_CHANNEL, EventType, JobEvent, event_channel
from .jobs import Img2ImgJob, valid_id
from .results import FailureDetails, JobResult
from .status import JobStatus
from .webhooks import outbox_push

__all__ = ["JobRecord", "JobStore", "JobNotFound", "Outage", "UnreadableRecord", "job_key", "cancel_key", "history_key",
           "DEAD_LETTERS_KEY", "DEAD_LETTERS_INDEX_KEY", "OPEN_JOBS_KEY", "RECORD_SCHEMA_VERSION", "stage_create",
           "raise_taken", "CREATED", "RESUBMITTED", "refused_status", "new_submission", "side_effects"]

RECORD_SCHEMA_VERSION = 2
"""Version of the stored record this code writes (1: records without ``schema_version``)."""
WAIT_RECONNECT_SECONDS = 30.0  # a waiter subscribes again this long after losing its connection (a failover)


class Outage:
    """A waiter's lost connections (a failover, a restart): worth another try for ``WAIT_RECONNECT_SECONDS``.

    The SDK's followers (``watch`` and ``wait`` of the sync and asyncio clients, ``darkroom augment``) call
    :meth:`lost` when a command raises ConnectionError or TimeoutError (giving up when it answers False) and
    :meth:`over` once a command succeeds again.
    """

    PAUSE_SECONDS = 0.5  # between tries

    def __init__(self, timeout: float | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._deadline = None if timeout is None else clock() + timeout
        self._since: float | None = None

    def lost(self) -> bool:
        """Whether to subscribe again: not while down for ``WAIT_RECONNECT_SECONDS``, nor past the wait's own timeout."""
        now = self._clock()
        if self._since is None:
            self._since = now
        return now - self._since < WAIT_RECONNECT_SECONDS and (self._deadline is None or now < self._deadline)

    def over(self) -> None:
        self._since = None


def job_key(job_id: str) -> str:
    return f"darkroom:job:{job_id}"


DEAD_LETTERS_KEY = "darkroom:dead-letters"
DEAD_LETTERS_INDEX_KEY = "darkroom:dead-letters:index"
JOBS_INDEX_KEY = "darkroom:jobs"
OPEN_JOBS_KEY = "darkroom:jobs:open"
RECONCILER_LOCK = "darkroom:reconciler:lock"  # read by workers before 2026-12-08 (one sweep per the taker's interval)
#: Redis-clock milliseconds when the fleet's last reconciler sweep began (claimed atomically, see worker/recovery.py)
RECONCILER_LAST = "darkroom:reconciler:last"


def history_key(job_id: str) -> str:
    return f"darkroom:job:{job_id}:history"


def new_submission() -> str:
    """A new submission's number: the clock in microseconds, 17 digits (string order = number order)."""
    return f"{time.time_ns() // 1000:017d}"


def cancel_key(job_id: str) -> str:
    return f"darkroom:job:{job_id}:cancel"


def _now() -> datetime:
    return datetime.now(UTC)


class JobNotFound(DarkroomError, KeyError):
    """Raised when no status record exists for a job id (never submitted, or expired)."""


class UnreadableRecord(DarkroomError):
    """Raised when a stored record cannot be read by this version (it is never rewritten then)."""

    def __init__(self, raw: bytes | str, reason: str) -> None:
        super().__init__(f"unreadable job record: {reason}")
        self.raw = raw


class JobRecord(BaseModel):
    """Everything known about a job right now.

    Stored records are read tolerantly (fields this version does not know are kept as they are, and
    ignored inside ``job``); what a user submits is validated strictly (:class:`Img2ImgJob`).
    ``submission`` and ``attempt`` form the fencing token of the job's current attempt
    (:class:`~darkroom.common.lifecycle.Fence`); the counters are numbers, never counts of history lines.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    job_id: str
    submission: str = ""
    status: JobStatus
    job: Img2ImgJob | None
    created_at: datetime
    updated_at: datetime
    schema_version: int = RECORD_SCHEMA_VERSION
    attempt: int = 0
    transient_retries: int = 0
    fatal_retries: int = 0
    unexpected_failures: int = 0
    reconciled: int = 0
    worker: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    details: FailureDetails | None = None
    result: JobResult | None = None
    raw_job: str | None = None
    producer: str | None = None  # the producer a worker verified (identity.Gate); webhooks are signed as it
    auth: dict[str, Any] | None = None  # the submission's signature envelope (identity)

    @field_validator("job", mode="before")
    @classmethod
    def _known_job_fields(cls, value: Any) -> Any:
        """A job stored by a newer producer may hold fields this version does not know: they are ignored."""
        if isinstance(value, dict):
            return {k: v for k, v in value.items() if k in Img2ImgJob.model_fields}
        return value

    @classmethod
    def read(cls, raw: bytes | str) -> JobRecord:
        """A stored record; UnreadableRecord when this version cannot make sense of it."""
        try:
            return cls.model_validate_json(raw)
        except (ValidationError, ValueError) as exc:
            raise UnreadableRecord(raw, str(exc)[:500]) from None

    @staticmethod
    def valid_id(value: str) -> bool:
        return valid_id(value)

    @property
    def lost_attempts(self) -> int:
        """Attempts that ended without an outcome (their worker died or was cut off mid-job)."""
        return max(0, self.attempt - self.transient_retries - self.fatal_retries)

    def evolve(self, **changes: Any) -> JobRecord:
        """This record with ``changes``, validated (unknown stored fields are kept)."""
        data = {**self.model_dump(), **changes}
        data["schema_version"] = max(self.schema_version, RECORD_SCHEMA_VERSION)
        return JobRecord.model_validate(data)

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
        """The record, or None; UnreadableRecord if this version cannot read it."""
        raw = self.redis.get(job_key(job_id))
        return None if raw is None else JobRecord.read(raw)

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
        """The records of ``job_ids`` in one round trip (None where a record expired or cannot be read)."""
        raws = self.redis.mget([job_key(j) for j in job_ids]) if job_ids else []
        return [_read_or_none(raw) for raw in raws]

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

    # -- cancelling --------------------------------------------------------
    def is_cancelled(self, job_id: str) -> bool:
        return bool(self.redis.exists(cancel_key(job_id)))

    # -- history and dead letters -------------------------------------------
    def history(self, job_id: str) -> list[dict[str, Any]]:
        """The job's history for people (newest 50 entries)."""
        return [json.loads(raw) for raw in self.redis.lrange(history_key(job_id), 0, -1)]

    def dead_letters(self) -> dict[str, dict[str, Any]]:
        raw = self.redis.hgetall(DEAD_LETTERS_KEY)
        return {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in raw.items()}

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


def _read_or_none(raw: bytes | str | None) -> JobRecord | None:
    if raw is None:
        return None
    try:
        return JobRecord.read(raw)
    except UnreadableRecord:
        return None


def side_effects(record: JobRecord) -> list[str | bytes]:
    """What goes with a change of ``record``: its event for waiters and its webhook, as (command, key, value)
    triples for a script to run in the same atomic step."""
    deferred = _Deferred()
    JobStore._publish(deferred, record, JobStore._event(record))
    return deferred.args


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
# A new record also clears what an earlier job of that id may have left (cancel flag, progress) and joins the
# open-jobs index. KEYS: record, cancel flag, progress, open-jobs index, jobs index (last: _INDEX_JOB reads
# KEYS[#KEYS]).
_OPEN = """
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('ZADD', KEYS[4], now[1] + now[2] / 1000000, string.sub(KEYS[1], 14))
"""
_CREATE = """
if not redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2], 'NX') then return 0 end
""" + _INDEX_JOB + _OPEN + """
for i = 3, #ARGV, 3 do redis.call(ARGV[i], ARGV[i + 1], ARGV[i + 2]) end
return 1
"""

# The same for a job that may be submitted again: a free id is created (reply 1); a record that ended
# failed or cancelled is replaced (reply 2): its cancel flag and last progress go, its history moves to
# :history:previous and the new one starts with a "resubmitted" note. Any other record is left as it is
# and its status is the reply. The new submission's number must be above the old one's (it orders
# result.json pointers): a submitter whose clock is behind gets the old number + 1.
# KEYS: record, cancel flag, progress, history, previous history, open-jobs index, jobs index.
# ARGV[1] record JSON, ARGV[2] TTL, ARGV[3] time of the note, then the triples as above.
_RESUBMIT = """
local current = redis.call('GET', KEYS[1])
local reply = 1
local record = ARGV[1]
if current then
  local ok, old = pcall(cjson.decode, current)
  if not ok or type(old) ~= 'table' then return 'unreadable' end
  if old['status'] ~= 'failed' and old['status'] ~= 'cancelled' then return old['status'] end
  local was = type(old['submission']) == 'string' and tonumber(old['submission']) or 0
  local new = tonumber(string.match(record, '"submission":"(%d+)"'))
  if new and was and new <= was then
    record = string.gsub(record, '"submission":"%d+"', '"submission":"' .. string.format('%017.0f', was + 1) .. '"', 1)
  end
  if redis.call('EXISTS', KEYS[4]) == 1 then
    redis.call('RENAME', KEYS[4], KEYS[5])
    redis.call('EXPIRE', KEYS[5], ARGV[2])
  end
  redis.call('RPUSH', KEYS[4], cjson.encode({event = 'resubmitted', time = ARGV[3], previous_status = old['status'],
    previous_error_code = old['error_code'], previous_attempt = old['attempt']}))
  redis.call('EXPIRE', KEYS[4], ARGV[2])
  reply = 2
end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('SET', KEYS[1], record, 'EX', ARGV[2])
""" + _INDEX_JOB + """
redis.call('ZADD', KEYS[6], now[1] + now[2] / 1000000, string.sub(KEYS[1], 14))
""" + """
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
        text = reply.decode() if isinstance(reply, bytes) else reply
        return JobStatus(text) if text in JobStatus.__members__.values() else JobStatus.QUEUED
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
    pipe: Any, job: Img2ImgJob, ttl: int, *, enqueue: tuple[str, str | bytes] | None = None, resubmit: bool = False,
    auth: dict[str, Any] | None = None, extra: Sequence[str | bytes] = (),
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
    record = JobRecord(job_id=job.job_id, status=JobStatus.QUEUED, job=job, created_at=now, updated_at=now,
                       submission=new_submission(), auth=auth)
    deferred = _Deferred()
    JobStore._publish(deferred, record, JobStore._event(record))
    if enqueue is not None:
        deferred.lpush(*enqueue)
    deferred.args += list(extra)  # more (command, key, value) triples, e.g. a message held for fair share
    key = job_key(job.job_id)
    flags = (cancel_key(job.job_id), key + ":progress")
    keys: tuple[str, ...]
    if resubmit:
        keys = (key, *flags, history_key(job.job_id), key + ":history:previous", OPEN_JOBS_KEY, JOBS_INDEX_KEY)
        pipe.eval(_RESUBMIT, len(keys), *keys, record.model_dump_json(), ttl, now.isoformat(), *deferred.args)
    else:
        keys = (key, *flags, OPEN_JOBS_KEY, JOBS_INDEX_KEY)
        pipe.eval(_CREATE, len(keys), *keys, record.model_dump_json(), ttl, *deferred.args)
    return record


def raise_taken(taken: list[tuple[int | None, str]], reason: str = "already exists; choose another id or omit it") -> None:
    """Raise InvalidJobError for job ids that already exist, as (index in the batch or None, id) pairs."""
    if taken:
        raise InvalidJobError([
            FieldError("job_id" if index is None else f"jobs[{index}].job_id", job_id, reason)
            for index, job_id in taken
        ])
