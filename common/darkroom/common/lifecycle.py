"""The job lifecycle: the one owner of every change to a job's record after it was submitted.

Start, retry, requeue, fail, succeed, cancel and dead-letter are each one call here, and each
call is one Redis script (:data:`_CAS`) that checks what it expects to find and writes only
then. The delivery handler, the runner, the reconciler and the clients call these and decide
nothing about states themselves.

**Fencing.** Every attempt to run a job gets a :class:`Fence`: the record's ``submission``
(fixed when the job was created) and ``attempt``, a counter that only grows; taking the lease
increments it. The lease value, every transition the attempt asks for, the object keys it
writes (``{job_id}/{submission}-{attempt}/...``) and its ``result.json`` carry that fence.
The script refuses a transition whose fence is not the record's current one (reply
``stale``), so a worker that paused past its lease and woke after another took the job over
can no longer change anything: it gets :class:`~darkroom.common.errors.LeaseLost`, stops,
acknowledges its message and moves on. ``result.json`` is replaced only by a newer fence
(compare-and-swap on its ETag; see the runner), so a stale attempt cannot publish either.

**Counters** are integer fields of the record (``attempt``, ``transient_retries``,
``fatal_retries``, ``unexpected_failures``, ``reconciled``); the history list is for people
and is capped (:data:`HISTORY_LIMIT`).

**Tolerant records.** Records carry ``schema_version``; readers ignore fields they do not
know (:class:`~darkroom.common.jobstore.JobRecord`), and a record that cannot be read at all
is never rewritten: its delivery goes to the dead-letter store.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import redis
from pydantic import ValidationError

from .bounds import keep_bounded
from .errors import ErrorCode, LeaseLost
from .events import EventType
from .jobs import Img2ImgJob
from .jobstore import (
    DEAD_LETTERS_INDEX_KEY,
    DEAD_LETTERS_KEY,
    OPEN_JOBS_KEY,
    JobNotFound,
    JobRecord,
    UnreadableRecord,
    cancel_key,
    history_key,
    job_key,
    new_submission,
    side_effects,
)
from .results import FailureDetails, JobResult
from .status import JobStatus

__all__ = ["Fence", "Lifecycle", "Started", "StartReply", "lease_key", "HISTORY_LIMIT", "RAW_MESSAGE_LIMIT"]

log = logging.getLogger(__name__)

HISTORY_LIMIT = 50
"""Entries kept in a job's history list (newest); counters live in the record, not here."""
RAW_MESSAGE_LIMIT = 8192
"""Characters of an unreadable message or record kept in its dead letter."""


def lease_key(job_id: str) -> str:
    return f"darkroom:lease:{job_id}"


@dataclass(frozen=True)
class Fence:
    """The token of one attempt: only the record's current (submission, attempt) may change it."""

    submission: str
    attempt: int

    @property
    def tag(self) -> str:
        """The attempt's name in object keys and lease values: ``{submission}-{attempt}``."""
        return f"{self.submission or '0'}-{self.attempt}"

    def newer_than(self, other: Fence) -> bool:
        return (self.submission, self.attempt) > (other.submission, other.attempt)


class StartReply(StrEnum):
    """What :meth:`Lifecycle.start` found."""

    STARTED = "started"      # this delivery holds the lease and runs the job
    ENDED = "ended"          # the job is terminal (a duplicate message): nothing runs
    HELD = "held"            # another live attempt holds the lease: defer this delivery
    DEAD = "dead"            # too many attempts ended without an outcome: failed, dead-lettered
    UNREADABLE = "unreadable"  # the stored record cannot be read: dead-lettered, never rewritten


@dataclass(frozen=True)
class Started:
    reply: StartReply
    record: JobRecord | None = None
    fence: Fence | None = None
    holder: str | None = None


# One compare-and-set for every transition.
# KEYS: 1 record, 2 lease, 3 history, 4 open-jobs index, 5 cancel flag, 6 dead letters, 7 dead-letter index
# ARGV: 1 expected submission ('*' = any), 2 expected attempt, 3 allowed current statuses (space separated;
#       'missing' allows no record), 4 new record JSON ('' = keep), 5 TTL seconds,
#       6 lease op (take | mark | release | ''), 7 lease value, 8 lease ms,
#       9 history entry ('' = none), 10 open-index op (add | rem | ''), 11 dead-letter field, 12 dead-letter entry
#       ('' = none), 13 dead-letter retention seconds, 14 dead-letter cap, 15 cancel op (set | del | ''),
#       16 cancel value, then (command, key, value) triples (PUBLISH / LPUSH) run after the write.
# Replies: 'ok', 'missing', 'unreadable', 'status:<current>', 'stale:<current>', 'held:<lease value>'.
_CAS = """
local cur = redis.call('GET', KEYS[1])
local status, sub, att = 'missing', '', '0'
if cur then
  local ok, rec = pcall(cjson.decode, cur)
  if (not ok) or type(rec) ~= 'table' or type(rec['status']) ~= 'string' then return 'unreadable' end
  status = rec['status']
  if type(rec['submission']) == 'string' then sub = rec['submission'] end
  if type(rec['attempt']) == 'number' then att = string.format('%d', rec['attempt']) end
end
if not string.find(' ' .. ARGV[3] .. ' ', ' ' .. status .. ' ', 1, true) then return 'status:' .. status end
if cur and ARGV[1] ~= '*' and (sub ~= ARGV[1] or att ~= ARGV[2]) then return 'stale:' .. status end
local op = ARGV[6]
if op == 'take' then
  local v = redis.call('GET', KEYS[2])
  if v and string.sub(v, 1, 6) ~= 'retry:' then return 'held:' .. v end
  redis.call('SET', KEYS[2], ARGV[7], 'PX', ARGV[8])
elseif op == 'mark' then
  redis.call('SET', KEYS[2], ARGV[7], 'PX', ARGV[8])
elseif op == 'release' then
  local v = redis.call('GET', KEYS[2])
  if v and string.sub(v, 1, string.len(ARGV[7])) == ARGV[7] then redis.call('DEL', KEYS[2]) end
end
if ARGV[4] ~= '' then redis.call('SET', KEYS[1], ARGV[4], 'EX', ARGV[5]) end
if ARGV[9] ~= '' then
  redis.call('RPUSH', KEYS[3], ARGV[9])
  redis.call('LTRIM', KEYS[3], -HISTORY_LIMIT, -1)
  redis.call('EXPIRE', KEYS[3], ARGV[5])
end
local now = redis.call('TIME')
local t = now[1] + now[2] / 1000000
if ARGV[10] == 'add' then redis.call('ZADD', KEYS[4], t, ARGV[11])
elseif ARGV[10] == 'rem' then redis.call('ZREM', KEYS[4], ARGV[11]) end
if ARGV[12] ~= '' then DEAD_LETTER end
if ARGV[15] == 'set' then redis.call('SET', KEYS[5], ARGV[16], 'EX', ARGV[5])
elseif ARGV[15] == 'del' then redis.call('DEL', KEYS[5]) end
for i = 17, #ARGV, 3 do redis.call(ARGV[i], ARGV[i + 1], ARGV[i + 2]) end
return 'ok'
""".replace("HISTORY_LIMIT", str(HISTORY_LIMIT)).replace(
    "DEAD_LETTER", keep_bounded("KEYS[6]", "KEYS[7]", "ARGV[11]", "ARGV[12]", "ARGV[13]", "ARGV[14]"))

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# Best-effort progress from a running attempt: stored and published only while the fence is current.
# KEYS: record, progress, cancel flag, outbox. ARGV: submission, attempt, event JSON, TTL, channel, all-channel,
# outbox entry ('' = none), outbox cap. Replies: 'ok', 'cancelled', 'stale'.
_PROGRESS = """
local cur = redis.call('GET', KEYS[1])
if not cur then return 'stale' end
local ok, rec = pcall(cjson.decode, cur)
if (not ok) or type(rec) ~= 'table' then return 'stale' end
local sub = type(rec['submission']) == 'string' and rec['submission'] or ''
local att = type(rec['attempt']) == 'number' and string.format('%d', rec['attempt']) or '0'
if rec['status'] == 'cancelled' or redis.call('EXISTS', KEYS[3]) == 1 then return 'cancelled' end
if rec['status'] ~= 'started' or sub ~= ARGV[1] or att ~= ARGV[2] then return 'stale' end
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
redis.call('PUBLISH', ARGV[5], ARGV[3])
redis.call('PUBLISH', ARGV[6], ARGV[3])
if ARGV[7] ~= '' and redis.call('LLEN', KEYS[4]) < tonumber(ARGV[8]) then redis.call('LPUSH', KEYS[4], ARGV[7]) end
return 'ok'
"""

_UNSTARTED = "queued missing"
_LIVE = "queued started"


def _now() -> datetime:
    return datetime.now(UTC)


def _text(reply: Any) -> str:
    return reply.decode() if isinstance(reply, bytes) else str(reply)


class Lifecycle:
    """Every status change of a job after its creation (creation: :mod:`.jobstore`), each one fenced script."""

    def __init__(self, client: redis.Redis, *, ttl_seconds: int = 7 * 24 * 3600,
                 dead_letter_retention_seconds: int = 30 * 24 * 3600, dead_letter_max: int = 10_000,
                 outbox_progress_cap: int = 10_000) -> None:
        self.redis = client
        self.ttl = ttl_seconds
        self.dead_retention = dead_letter_retention_seconds
        self.dead_max = dead_letter_max
        self.outbox_progress_cap = outbox_progress_cap
        self._cas = client.register_script(_CAS)
        self._renew = client.register_script(_RENEW)
        self._progress = client.register_script(_PROGRESS)

    # -- reads -------------------------------------------------------------
    def read(self, job_id: str) -> JobRecord | None:
        """The record (fields this version does not know are ignored); UnreadableRecord if it cannot be read."""
        raw = self.redis.get(job_key(job_id))
        return None if raw is None else JobRecord.read(raw)

    # -- starting ----------------------------------------------------------
    def start(self, job_id: str, job: Img2ImgJob | None, *, worker: str, lease_seconds: float,
              max_lost: int, producer: str | None = None, auth: dict[str, Any] | None = None) -> Started:
        """Take the job's lease and move it to ``started`` with a new fence, in one step.

        ``job`` (the message's) makes the record when none exists (a plain ``send_task`` producer, or the
        record expired); with a record, the record's job runs and the message only names it. ``producer``: the
        one a worker verified (:mod:`.identity`), kept in the record; ``auth`` goes into a record made from ``job``.
        """
        for _ in range(20):  # optimistic: re-read when the record changed between the read and the script
            try:
                current = self.read(job_id)
            except UnreadableRecord as exc:
                self._dead_letter_raw(job_id, "the stored record cannot be read by this worker", exc.raw)
                return Started(StartReply.UNREADABLE)
            if current is None and job is None:
                return Started(StartReply.ENDED)
            if current is not None and current.status.is_terminal:
                return Started(StartReply.ENDED, current)
            started = self._try_start(job_id, current, job, worker, lease_seconds, max_lost, producer, auth)
            if started is not None:
                return started
        raise RuntimeError(f"job {job_id}: the record kept changing while starting")

    def _try_start(self, job_id: str, current: JobRecord | None, job: Img2ImgJob | None, worker: str,
                   lease_seconds: float, max_lost: int, producer: str | None = None,
                   auth: dict[str, Any] | None = None) -> Started | None:
        now = _now()
        if current is None:
            assert job is not None
            current = JobRecord(job_id=job_id, status=JobStatus.QUEUED, job=job, created_at=now, updated_at=now,
                                submission=new_submission(), auth=auth)
        lost = current.lost_attempts
        if lost >= max_lost:
            return self._start_dead(current, lost)
        fence = Fence(current.submission, current.attempt + 1)
        record = current.evolve(status=JobStatus.STARTED, attempt=fence.attempt, worker=worker, error_code=None,
                                error_message=None, details=None, updated_at=now,
                                producer=producer or current.producer)
        reply = self._write(current, record, expect=_UNSTARTED if current.status is JobStatus.QUEUED else _LIVE,
                            lease=("take", f"{fence.tag}@{worker}", int(lease_seconds * 1000)),
                            note=("started", {"attempt": fence.attempt, "worker": worker,
                                                  "submission": fence.submission}), open_op="add",
                            stored=self._stored(current))
        if reply == "ok":
            return Started(StartReply.STARTED, record, fence)
        if reply.startswith("held:"):
            return Started(StartReply.HELD, current, holder=reply[5:])
        if reply.startswith("status:") and JobStatus(reply[7:]).is_terminal:
            return Started(StartReply.ENDED, self.read(job_id))
        return None  # changed meanwhile: read again

    def _start_dead(self, current: JobRecord, lost: int) -> Started:
        reason = f"{lost} attempts ended without an outcome (the worker was lost each time)"
        record = current.evolve(status=JobStatus.FAILED, error_code=ErrorCode.DELIVERY_LIMIT.value,
                                error_message=f"moved to the dead-letter store: {reason}", updated_at=_now())
        reply = self._write(current, record, expect=_LIVE + " missing", note=("dead_letter", {"reason": reason}),
                            open_op="rem", dead=self._dead_entry(current, reason), stored=self._stored(current))
        if reply != "ok":
            return Started(StartReply.ENDED, self.read(current.job_id))
        log.error("job %s moved to the dead-letter store: %s", current.job_id, reason)
        return Started(StartReply.DEAD, record)

    def renew(self, job_id: str, value: str, lease_seconds: float) -> bool:
        """Extend a lease that ``value`` still holds."""
        return bool(self._renew(keys=[lease_key(job_id)], args=[value, int(lease_seconds * 1000)]))

    # -- outcomes of a running attempt ---------------------------------------
    def succeed(self, fence: Fence, record: JobRecord, result: JobResult) -> JobRecord:
        """``started`` → ``succeeded`` with ``result``; LeaseLost if the fence is stale (nothing written)."""
        return self._finish(fence, record, JobStatus.SUCCEEDED, "finished", result=result)

    def fail(self, fence: Fence, record: JobRecord, code: ErrorCode | str, message: str,
             details: FailureDetails | None = None, *, note: str = "finished") -> JobRecord:
        """``started`` → ``failed`` with ``code``; LeaseLost if the fence is stale."""
        return self._finish(fence, record, JobStatus.FAILED, note, error_code=str(code),
                            error_message=message, details=details)

    def cancelled(self, fence: Fence, record: JobRecord, reason: str = "cancelled while running") -> JobRecord:
        """A running attempt stopped by a cancel: ``cancelled`` unless the cancel already said so."""
        try:
            return self._finish(fence, record, JobStatus.CANCELLED, "finished", error_code="cancelled",
                                error_message=reason)
        except LeaseLost:
            return self.read(record.job_id) or record

    def _finish(self, fence: Fence, record: JobRecord, status: JobStatus, note: str, **changes: Any) -> JobRecord:
        new = record.evolve(status=status, updated_at=_now(), **changes)
        reply = self._write(record, new, fence=fence, expect="started", lease=("release", f"{fence.tag}@", 0),
                            note=(note, {"attempt": fence.attempt, "status": status.value,
                                         "submission": fence.submission}), open_op="rem")
        if reply != "ok":
            raise LeaseLost(record.job_id, f"cannot end the job {status.value}: {self._why(reply)}")
        return new

    def retry(self, fence: Fence, record: JobRecord, error: str, *, max_retries: int, delay: Callable[[int], float],
              lease_seconds: float) -> tuple[JobRecord, float]:
        """After a transient error: ``queued`` again with ``transient_retries`` + 1 and the lease a retry marker for
        ``delay(retries so far)`` seconds; past ``max_retries`` retries, ``failed`` with ``transient_exhausted``.
        Returns the record and the delay (0 when it failed); LeaseLost if the fence is stale."""
        done = record.transient_retries
        if done >= max_retries:
            message = f"gave up after {done} retries: {error}"
            return self.fail(fence, record, ErrorCode.TRANSIENT_EXHAUSTED, message), 0.0
        wait = delay(done)
        new = record.evolve(status=JobStatus.QUEUED, transient_retries=done + 1, updated_at=_now(),
                            error_message=f"retrying in {wait:.1f} s after a transient error: {error}")
        reply = self._write(record, new, fence=fence, expect="started",
                            lease=("mark", f"retry:{fence.tag}", int((wait + lease_seconds) * 1000)),
                            note=("transient", {"attempt": fence.attempt, "error": error, "retry_in": round(wait, 2)}),
                            open_op="add")
        if reply != "ok":
            raise LeaseLost(record.job_id, f"cannot schedule a retry: {self._why(reply)}")
        return new, wait

    def requeue_fatal(self, fence: Fence, record: JobRecord, error: str) -> JobRecord:
        """After a worker-fatal error: ``queued`` once more, or ``failed worker_fatal`` the second time."""
        if record.fatal_retries >= 1:
            return self.fail(fence, record, ErrorCode.WORKER_FATAL,
                             f"{error} (twice, on two worker processes; the job is likely too large for the device)",
                             note="worker_fatal")
        new = record.evolve(status=JobStatus.QUEUED, fatal_retries=record.fatal_retries + 1,
                            error_message=f"requeued once after a worker-fatal error: {error}", updated_at=_now())
        reply = self._write(record, new, fence=fence, expect="started", lease=("release", f"{fence.tag}@", 0),
                            note=("worker_fatal", {"attempt": fence.attempt, "error": error}), open_op="add")
        if reply != "ok":
            raise LeaseLost(record.job_id, f"cannot requeue: {self._why(reply)}")
        return new

    def report_progress(self, fence: Fence, record: JobRecord, step: int, total: int) -> str:
        """Best-effort progress of a running attempt: 'ok', 'cancelled' (stop now) or 'stale' (lease lost)."""
        from .webhooks import OUTBOX_KEY, outbox_entry

        event = record.as_event(EventType.PROGRESS, time=_now(), step=step, total_steps=total)
        data = event.model_dump_json()
        entry = outbox_entry(record, event)
        reply = self._progress(
            keys=[job_key(record.job_id), job_key(record.job_id) + ":progress", cancel_key(record.job_id),
                  OUTBOX_KEY],
            args=[fence.submission, fence.attempt, data, self.ttl, f"darkroom:events:{record.job_id}",
                  "darkroom:events", "" if entry is None else entry, self.outbox_progress_cap])
        return _text(reply)

    # -- the producer's side ------------------------------------------------
    def cancel_job(self, job_id: str, reason: str = "cancelled on request") -> JobRecord:
        """:meth:`cancel` for callers that only want the record; JobNotFound for an unknown id."""
        record, _ = self.cancel(job_id, reason)
        if record is None:
            raise JobNotFound(job_id)
        return record

    def cancel(self, job_id: str, reason: str = "cancelled on request") -> tuple[JobRecord | None, bool]:
        """Cancel a queued or running job: (its record, True). A job that ended is left as it is: (record, False).

        The flag a running attempt checks at each step is set only for a live job, in the same step, and
        expires with the record; creating a job clears it.
        """
        for _ in range(20):
            current = self.read(job_id)
            if current is None:
                return None, False
            if current.status.is_terminal:
                return current, False
            new = current.evolve(status=JobStatus.CANCELLED, error_code="cancelled", error_message=reason,
                                 updated_at=_now())
            reply = self._write(current, new, fence=Fence(current.submission, current.attempt), expect=_LIVE,
                                note=("cancelled", {"reason": reason}), open_op="rem",
                                cancel=("set", current.submission or "1"))
            if reply == "ok":
                return new, True
        raise RuntimeError(f"job {job_id}: the record kept changing while cancelling")

    # -- messages that cannot run ---------------------------------------------
    def reject_message(self, job_id: str, message: str, raw: Any) -> JobRecord | None:
        """A message with a job id but no valid job and no record: a ``failed invalid_job`` record."""
        now = _now()
        record = JobRecord(job_id=job_id, status=JobStatus.FAILED, job=None, created_at=now, updated_at=now,
                           submission=new_submission(), error_code=ErrorCode.INVALID_JOB.value,
                           error_message=message, raw_job=_cut(raw))
        reply = self._write(None, record, expect="missing", note=("rejected", {"error": message[:500]}))
        return record if reply == "ok" else None

    def refuse(self, record: JobRecord, code: ErrorCode, message: str) -> JobRecord | None:
        """A queued job that may not run (unauthenticated, not permitted): ``failed`` with ``code``, unstarted;
        None when the record changed meanwhile."""
        new = record.evolve(status=JobStatus.FAILED, error_code=code.value, error_message=message, updated_at=_now())
        reply = self._write(record, new, fence=Fence(record.submission, record.attempt), expect="queued",
                            note=("refused", {"code": code.value, "error": message[:500]}), open_op="rem")
        return new if reply == "ok" else None

    def dead_letter_message(self, raw: Any, reason: str) -> str:
        """A message without a usable job id: kept (cut to RAW_MESSAGE_LIMIT) in the dead-letter store."""
        field = f"message:{time.time_ns():x}"
        self._dead_letter_raw(field, reason, raw)
        return field

    def count_unexpected(self, job_id: str) -> int:
        """Count a delivery that broke outside the job (in the record); returns the count so far."""
        for _ in range(5):
            try:
                current = self.read(job_id)
            except UnreadableRecord:
                return 0
            if current is None or current.status.is_terminal:
                return 0
            new = current.evolve(unexpected_failures=current.unexpected_failures + 1)
            if self._write(current, new, expect=current.status.value) == "ok":
                return new.unexpected_failures
        return 0

    def dead_letter(self, record: JobRecord, reason: str) -> JobRecord | None:
        """Fail a live job into the dead-letter store (e.g. its deliveries keep breaking)."""
        new = record.evolve(status=JobStatus.FAILED, error_code=ErrorCode.DELIVERY_LIMIT.value,
                            error_message=f"moved to the dead-letter store: {reason}", updated_at=_now())
        reply = self._write(record, new, fence=Fence(record.submission, record.attempt), expect=_LIVE,
                            note=("dead_letter", {"reason": reason}), open_op="rem",
                            dead=self._dead_entry(record, reason))
        return new if reply == "ok" else None

    def reconciled(self, record: JobRecord) -> bool:
        """Count a requeue by the reconciler (the record must not have changed since it was read)."""
        new = record.evolve(reconciled=record.reconciled + 1)
        return self._write(record, new, fence=Fence(record.submission, record.attempt), expect=record.status.value,
                           note=("reconciled", {"status": record.status.value}), open_op="add") == "ok"

    def note(self, job_id: str, event: str, **details: Any) -> None:
        """Append to the job's history for people (capped; no decision reads it)."""
        entry = json.dumps({"event": event, "time": _now().isoformat(), **details}, default=str)
        key = history_key(job_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.rpush(key, entry)
        pipe.ltrim(key, -HISTORY_LIMIT, -1)
        pipe.expire(key, self.ttl)
        pipe.execute()

    # -- internals ----------------------------------------------------------
    def _write(self, current: JobRecord | None, new: JobRecord, *, expect: str, fence: Fence | None = None,
               lease: tuple[str, str, int] | None = None, note: tuple[str, dict[str, Any]] | None = None,
               open_op: str = "", dead: str = "", cancel: tuple[str, str] | None = None,
               stored: Fence | None = None) -> str:
        """Run the compare-and-set: ``new`` replaces the record if it still is what ``current`` was."""
        check = fence or stored or (Fence(current.submission, current.attempt) if current is not None else None)
        job_id = new.job_id
        lease_op, lease_value, lease_ms = lease or ("", "", 0)
        entry = ""
        if note is not None:
            entry = json.dumps({"event": note[0], "time": _now().isoformat(), **note[1]}, default=str)
        publish = side_effects(new) if current is None or new.status is not current.status or \
            new.attempt != current.attempt else []
        args: list[Any] = [
            "*" if check is None else check.submission, 0 if check is None else check.attempt, expect,
            new.model_dump_json(), self.ttl, lease_op, lease_value, lease_ms, entry, open_op, job_id, dead,
            self.dead_retention, self.dead_max, *(cancel or ("", "")), *publish,
        ]
        keys = [job_key(job_id), lease_key(job_id), history_key(job_id), OPEN_JOBS_KEY, cancel_key(job_id),
                DEAD_LETTERS_KEY, DEAD_LETTERS_INDEX_KEY]
        return _text(self._cas(keys=keys, args=args))

    @staticmethod
    def _stored(record: JobRecord) -> Fence | None:
        return Fence(record.submission, record.attempt)

    def _dead_entry(self, record: JobRecord, reason: str) -> str:
        history = [json.loads(r) for r in self.redis.lrange(history_key(record.job_id), 0, -1)]
        job = record.job.model_dump(mode="json") if record.job is not None else record.raw_job
        return json.dumps({"job": job, "reason": reason, "time": _now().isoformat(), "history": history},
                          default=str)

    def _dead_letter_raw(self, field: str, reason: str, raw: Any) -> None:
        entry = json.dumps({"reason": reason, "time": _now().isoformat(), "raw": _cut(raw)}, default=str)
        keys = [job_key(f"-dead-{field}"), lease_key(""), history_key(""), OPEN_JOBS_KEY, cancel_key(""),
                DEAD_LETTERS_KEY, DEAD_LETTERS_INDEX_KEY]
        # no record is written (expect 'missing' of a key nothing uses); only the dead letter
        self._cas(keys=keys, args=["*", 0, "missing", "", self.ttl, "", "", 0, "", "", field, entry,
                                   self.dead_retention, self.dead_max, "", ""])
        log.error("dead-lettered %s: %s", field, reason)

    @staticmethod
    def _why(reply: str) -> str:
        kind, _, status = reply.partition(":")
        if kind == "stale":
            return f"another attempt holds the job now (it is {status})"
        if kind == "status":
            return f"the job is {status}"
        return reply


def _cut(raw: Any) -> str:
    """An unreadable message or record as text, at most RAW_MESSAGE_LIMIT characters."""
    if isinstance(raw, bytes):
        text = raw.decode("utf-8", "replace")
    elif isinstance(raw, str):
        text = raw
    else:
        try:
            text = json.dumps(raw, default=str)
        except (TypeError, ValueError):
            text = repr(raw)
    if len(text) > RAW_MESSAGE_LIMIT:
        return text[:RAW_MESSAGE_LIMIT] + f"... ({len(text)} characters)"
    return text


def message_job(payload: Any) -> tuple[str | None, Img2ImgJob | None, str | None, list[str]]:
    """Read a task message's one argument: (job id, job, why it is invalid, fields ignored).

    The argument is the job as one JSON object, optionally with ``schema_version``. A message of a newer
    schema than this one keeps only the fields this version knows (they are listed); otherwise it is
    validated as strictly as a submission.
    """
    from .errors import InvalidJobError
    from .identity import strip_auth
    from .jobs import MESSAGE_SCHEMA_VERSION, validate_job

    if not isinstance(payload, Mapping):
        return None, None, f"the task argument is a {type(payload).__name__}, not a JSON object (the job)", []
    job_id = payload.get("job_id")
    job_id = job_id if isinstance(job_id, str) and JobRecord.valid_id(job_id) else None
    data, _ = strip_auth(payload)  # the signature envelope; the worker's identity.Gate checked it
    version = data.pop("schema_version", 1)
    ignored: list[str] = []
    if isinstance(version, int) and version > MESSAGE_SCHEMA_VERSION:
        known = set(Img2ImgJob.model_fields)
        ignored = sorted(k for k in data if k not in known)
        data = {k: v for k, v in data.items() if k in known}
    try:
        return job_id, validate_job(data), None, ignored
    except InvalidJobError as exc:
        return job_id, None, str(exc), ignored
    except (ValidationError, TypeError, ValueError) as exc:
        return job_id, None, f"{type(exc).__name__}: {exc}", ignored
