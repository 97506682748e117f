"""Darkroom's errors: one root, three outcomes, stable machine-readable codes.

Every error a job can end with carries an :class:`ErrorCode`. The classes say
what the system should *do* about the error, which is what matters at a fleet's
scale::

    DarkroomError                 root of everything raised by Darkroom
    ├── InvalidJobError           refused at submit time (field, value, allowed range)
    ├── ConfigurationError        settings or registry are wrong; fix and restart
    ├── JobError                  the job failed for good (bad input, unknown model); never retried
    ├── TransientError            try again later (storage 5xx, broker blip); retried with backoff, bounded
    │   └── RedisUnavailable      Redis did not answer or is failing over; the SDK's request may be retried
    │       └── NotReplicated     a submission reached the primary but too few replicas confirmed it in time
    ├── WorkerFatalError          the process is unusable (CUDA OOM, corrupt state); requeue, recycle
    ├── NotPermitted              a producer asked for another producer's job, or past its policy or quota
    ├── LeaseLost                 this attempt's fencing token is stale: stop, write nothing, ack the message
    ├── UnreadableRecord          a stored record this version cannot read (darkroom.common.jobstore)
    ├── JobNotFound               no record for a job id (darkroom.common.jobstore; also a KeyError)
    ├── WebhookVerificationError  a webhook's signature or timestamp is wrong (darkroom.common.webhooks)
    ├── StorageError              object storage said no
    │   ├── ObjectNotFoundError   the object does not exist
    │   └── ObjectTooLargeError   the object is larger than allowed
    └── SDK outcomes (raised to producers)
        ├── JobFailed             the job ended ``failed`` (carries code and message)
        ├── JobCancelled          the job ended ``cancelled``
        └── WaitTimeout           the job was not terminal before the timeout
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

__all__ = [
    "ConfigurationError",
    "DarkroomError",
    "ErrorCode",
    "FieldError",
    "InvalidJobError",
    "JobCancelled",
    "JobError",
    "JobFailed",
    "LeaseLost",
    "NotPermitted",
    "NotReplicated",
    "ObjectNotFoundError",
    "ObjectTooLargeError",
    "RedisUnavailable",
    "StorageError",
    "TransientError",
    "WaitTimeout",
    "WorkerFatalError",
    "shown",
]

#: Longest part of a refused value that a message repeats.
SHOWN_CHARS = 80
_ADDRESS = re.compile(r" ?<[\w.]+ object at 0x[0-9a-fA-F]+>")


def shown(value: Any) -> str:
    """``repr(value)`` for a message: its first 80 characters and its length when it is longer."""
    text = repr(value)
    if len(text) <= SHOWN_CHARS:
        return text
    if isinstance(value, str | bytes):
        size = f"{len(value):,} {'characters' if isinstance(value, str) else 'bytes'}"
    elif isinstance(value, list | tuple | dict):
        size = f"{len(value):,} items"
    else:
        size = f"{len(text):,} characters"
    return f"{text[:SHOWN_CHARS]}... ({size})"


class ErrorCode(StrEnum):
    """Stable codes a failed job can carry. Clients may switch on them."""

    INVALID_JOB = "invalid_job"
    INPUT_NOT_FOUND = "input_not_found"
    INPUT_TOO_LARGE = "input_too_large"
    INPUT_UNREADABLE = "input_unreadable"
    INPUT_UNSUPPORTED = "input_unsupported"
    INPUT_FLAGGED = "input_flagged"
    BUCKET_NOT_ALLOWED = "bucket_not_allowed"
    MODEL_NOT_FOUND = "model_not_found"
    MODEL_LOAD_FAILED = "model_load_failed"
    MODEL_TOO_LARGE = "model_too_large"
    ADAPTER_NOT_FOUND = "adapter_not_found"
    ADAPTER_NOT_ALLOWED = "adapter_not_allowed"
    ADAPTER_INVALID = "adapter_invalid"
    EMBEDDING_NOT_FOUND = "embedding_not_found"
    EMBEDDING_INVALID = "embedding_invalid"
    OUTPUT_WRITE_FAILED = "output_write_failed"
    TRANSIENT_EXHAUSTED = "transient_exhausted"
    DELIVERY_LIMIT = "delivery_limit"
    TIMEOUT = "timeout"
    WORKER_FATAL = "worker_fatal"
    INTERNAL_ERROR = "internal_error"
    UNAUTHENTICATED = "unauthenticated"
    NOT_PERMITTED = "not_permitted"
    QUOTA_EXCEEDED = "quota_exceeded"
    UPSTREAM_FAILED = "upstream_failed"


class DarkroomError(Exception):
    """Raised when anything in Darkroom goes wrong; the root of the tree above."""

    retryable: ClassVar[bool] = False
    """Whether trying the same request again later may succeed (True for :class:`TransientError` and below)."""


@dataclass(frozen=True)
class FieldError:
    """One refused field: where it is, what was sent and what is allowed."""

    field: str
    value: Any
    message: str
    allowed: str | None = None

    def __str__(self) -> str:
        allowed = f"; allowed: {self.allowed}" if self.allowed else ""
        return f"{self.field}={shown(self.value)}: {self.message}{allowed}"


class InvalidJobError(DarkroomError, ValueError):
    """Raised when a job is refused at submit time; lists every bad field."""

    code = ErrorCode.INVALID_JOB

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        lines = "\n".join(f"  - {e}" for e in errors)
        super().__init__(f"invalid job ({len(errors)} field error(s)):\n{lines}")


class ConfigurationError(DarkroomError):
    """Raised when settings or the model registry are wrong; the process cannot start."""


class JobError(DarkroomError):
    """Raised when a job must end ``failed`` with a code; it is never retried."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        self.code = code
        self.message = _ADDRESS.sub("", message)  # "<_io.BytesIO object at 0x7f..>" means nothing to a user
        super().__init__(f"[{code}] {self.message}")


class NotPermitted(DarkroomError):
    """Raised when a producer reads, cancels or resubmits another producer's job, or goes past its policy or quota
    (``retry_after``: seconds until the quota allows it again)."""

    def __init__(self, code: ErrorCode, message: str, retry_after: float | None = None) -> None:
        self.code = code
        self.message = message
        self.retry_after = retry_after
        super().__init__(f"[{code}] {message}")


class TransientError(DarkroomError):
    """Raised when an operation may succeed if retried later (storage 5xx, timeouts)."""

    retryable: ClassVar[bool] = True


class RedisUnavailable(TransientError):
    """Raised by the SDK when Redis does not answer, refuses writes or has no primary (a Sentinel failover, a
    restart): retry the same request after a few seconds.

    ``job_ids`` names the jobs of a submission that broke: they may or may not have been recorded. Submitting
    the same jobs again (same ``job_id``, as in ``jobs``) is safe: a job already recorded with the same content
    counts as submitted, never twice.
    """

    def __init__(self, message: str, job_ids: list[str] | None = None, jobs: list[Any] | None = None) -> None:
        self.job_ids = list(job_ids or [])
        self.jobs = list(jobs or [])
        super().__init__(message)


class NotReplicated(RedisUnavailable):
    """Raised by the SDK when a submission was written to the Redis primary but fewer replicas than
    ``redis_wait_replicas`` confirmed it within ``redis_wait_timeout_ms``: a failover now could lose it. The jobs
    may run; submitting them again (same ids, see ``jobs``) is safe and confirms them."""

    def __init__(self, message: str, job_ids: list[str], jobs: list[Any], *, wanted: int, confirmed: int) -> None:
        self.wanted = wanted
        self.confirmed = confirmed
        super().__init__(message, job_ids, jobs)


class WorkerFatalError(DarkroomError):
    """Raised when the worker process is unusable (e.g. CUDA out of memory) and must recycle."""


class LeaseLost(DarkroomError):
    """Raised when an attempt's fencing token is no longer the job's current one (another attempt took the job
    over, or it was cancelled): the attempt stops and writes nothing more."""

    def __init__(self, job_id: str, message: str) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id}: {message}")


class StorageError(DarkroomError):
    """Raised when object storage refuses a request for a reason retrying will not fix."""


class ObjectNotFoundError(StorageError):
    """Raised when an object (or its bucket) does not exist."""


class ObjectTooLargeError(StorageError):
    """Raised when an object is larger than the caller allows; nothing was downloaded."""


@dataclass(eq=False)
class _Outcome(DarkroomError):
    job_id: str
    code: str | None = None
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        code = f" [{self.code}]" if self.code else ""
        return f"job {self.job_id}{code}: {self.message}"


class JobFailed(_Outcome):
    """Raised by the SDK when a job ended ``failed``; ``code`` says why."""


class JobCancelled(_Outcome):
    """Raised by the SDK when a job ended ``cancelled``."""


class WaitTimeout(_Outcome, TimeoutError):
    """Raised by the SDK when a job did not finish within the given timeout."""
