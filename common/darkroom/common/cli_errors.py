"""What the ``darkroom`` command line says when an expected condition stops it.

Services not running, wrong credentials, a missing bucket: each becomes one line on stderr and an
exit code from the table below, never a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from darkroom.common.errors import DarkroomError, RedisUnavailable
from darkroom.common.storage_hints import caused_by, settings_source, storage_hint

__all__ = ["ExitCode", "Failure", "explain", "no_worker_notice", "settings_source"]


class ExitCode:
    """Exit codes shared by every command (sysexits.h where one fits)."""

    OK = 0
    FAILED = 1  # a job failed, or a request was refused (bad value, missing object or bucket)
    CANCELLED = 2  # the job was cancelled (wait, submit --wait); click also exits 2 on a usage error
    TIMEOUT = 3  # --timeout passed before the job ended
    UNAVAILABLE = 69  # Redis or the S3 server cannot be reached (services not running?)
    NO_PERMISSION = 77  # Redis or S3 refused the credentials
    INTERRUPTED = 130  # Ctrl-C


class Failure(NamedTuple):
    message: str
    exit_code: int


def explain(exc: BaseException) -> Failure | None:
    """A one-line message and exit code for an expected condition; None for anything else."""
    import redis.exceptions

    if isinstance(exc, RedisUnavailable) and isinstance(exc.__cause__, redis.exceptions.RedisError):
        return explain(exc.__cause__)  # the SDK's retryable wrapper: say what Redis said, as before
    if isinstance(exc, redis.exceptions.AuthenticationError | redis.exceptions.AuthenticationWrongNumberOfArgsError):
        return Failure(f"Redis refused the credentials ({settings_source()}): check the password in "
                       "DARKROOM_REDIS_URL", ExitCode.NO_PERMISSION)
    if isinstance(exc, redis.exceptions.ResponseError) and "NOAUTH" in str(exc):
        return Failure(f"Redis needs a password ({settings_source()}): put it in DARKROOM_REDIS_URL",
                       ExitCode.NO_PERMISSION)
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return Failure(f"cannot reach Redis ({_first_line(exc)}); {settings_source()}. Start the services with "
                       "'darkroom services up' (or run from the folder where you did), or set DARKROOM_REDIS_URL",
                       ExitCode.UNAVAILABLE)
    hint = storage_hint(exc)
    if hint is not None:
        unreachable = caused_by(exc, "EndpointConnectionError", "ConnectTimeoutError")
        return Failure(hint, ExitCode.UNAVAILABLE if unreachable else ExitCode.NO_PERMISSION)
    if isinstance(exc, DarkroomError):
        return Failure(_first_line(exc), ExitCode.FAILED)
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def no_worker_notice(client: Any, job_id: str) -> str | None:
    """For ``wait``: a line saying that no live worker serves a queued job's model, and how to start one.

    None when the job is not queued (a worker has it, or it ended), cannot be read (``wait`` reports that), or a
    live worker (one whose heartbeat is fresh) serves its model.
    """
    from darkroom.common.status import JobStatus

    try:
        record = client.status(job_id)
    except DarkroomError:
        return None
    if record.status is not JobStatus.QUEUED or record.job is None:
        return None
    model = record.job.model
    live = client.fleet.workers(fresh=True)
    if any(model in worker.models for worker in live):
        return None
    others = f" (live workers serve only: {', '.join(sorted({m for w in live for m in w.models}))})" if live else ""
    return (f"no live worker serves model {model!r}{others}: no worker has sent a heartbeat for it "
            f"({settings_source()}); the job stays queued until one starts: darkroom worker --model {model}=SOURCE")
