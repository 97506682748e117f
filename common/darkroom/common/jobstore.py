"""Job status in Redis: one JSON record per job, changed only by legal transitions.

Keys (all expire after ``Settings.status_ttl_seconds``)::

    darkroom:job:{job_id}            JobRecord as JSON
    darkroom:job:{job_id}:progress   last progress event as JSON (best effort)
    darkroom:job:{job_id}:cancel     present once the job was cancelled (the worker checks it)

Every transition also publishes a :class:`JobEvent` on ``darkroom:events:{job_id}``
and on ``darkroom:events``, so waiters wake at once instead of polling.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict

from .errors import JobCancelled, JobFailed, WaitTimeout
from .events import ALL_EVENTS_CHANNEL, EventType, JobEvent, event_channel
from .jobs import Img2ImgJob
from .results import JobResult
from .status import IllegalTransition, JobStatus
from .webhooks import outbox_push

__all__ = ["JobRecord", "JobStore", "JobNotFound", "job_key", "cancel_key"]


def job_key(job_id: str) -> str:
    return f"darkroom:job:{job_id}"


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
    result: JobResult | None = None

    def raise_for_outcome(self) -> JobResult:
        """Return the result of a succeeded job, or raise what its ending means."""
        if self.status is JobStatus.SUCCEEDED and self.result is not None:
            return self.result
        if self.status is JobStatus.CANCELLED:
            raise JobCancelled(self.job_id, self.error_code, self.error_message or "cancelled")
        if self.status is JobStatus.FAILED:
            raise JobFailed(self.job_id, self.error_code, self.error_message or "failed")
        raise WaitTimeout(self.job_id, None, f"job is {self.status.value}, not finished")


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

    # -- writes ----------------------------------------------------------
    def create(self, job: Img2ImgJob, pipe: Any | None = None) -> JobRecord:
        """Record a new ``queued`` job. With ``pipe`` the commands join a caller's pipeline."""
        assert job.job_id is not None
        now = _now()
        record = JobRecord(job_id=job.job_id, status=JobStatus.QUEUED, job=job, created_at=now, updated_at=now)
        target = pipe if pipe is not None else self.redis.pipeline(transaction=False)
        target.set(job_key(job.job_id), record.model_dump_json(), ex=self.ttl, nx=True)
        self._publish(target, record, self._event(record))
        if pipe is None:
            ok = target.execute()[0]
            if not ok:
                raise ValueError(f"job_id {job.job_id!r} already exists; choose another or omit it")
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
                    raw = pipe.get(key)
                    now = _now()
                    if raw is None:
                        if job is None:
                            raise JobNotFound(job_id)
                        current = JobRecord(
                            job_id=job_id, status=JobStatus.QUEUED, job=job, created_at=now, updated_at=now
                        )
                    else:
                        current = JobRecord.model_validate_json(raw)
                    current.status.assert_can_become(status)
                    record = current.model_copy(update={**changes, "status": status, "updated_at": now})
                    record = JobRecord.model_validate(record.model_dump())
                    pipe.multi()
                    pipe.set(key, record.model_dump_json(), ex=self.ttl)
                    self._publish(pipe, record, self._event(record))
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
        return JobEvent(
            type=type_ or EventType.for_status(record.status),
            job_id=record.job_id,
            status=record.status,
            time=_now(),
            attempt=record.attempt,
            worker=record.worker,
            error_code=record.error_code,
            error_message=record.error_message,
            **extra,
        )

    @staticmethod
    def _publish(pipe: Any, record: JobRecord, event: JobEvent) -> None:
        """Publish the event to waiters and queue its webhook, in the caller's transaction."""
        data = event.model_dump_json()
        pipe.publish(event_channel(event.job_id), data)
        pipe.publish(ALL_EVENTS_CHANNEL, data)
        outbox_push(pipe, record, event)
