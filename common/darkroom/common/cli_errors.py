"""What the ``darkroom`` command line says when an expected condition stops it.

Services not running, wrong credentials, a missing bucket: each becomes one line on stderr and an
exit code from the table below, never a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from darkroom.common.errors import DarkroomError, ObjectNotFoundError, RedisUnavailable, StorageError, TransientError
from darkroom.common.settings import DEFAULT_STATE_DIR

__all__ = ["ExitCode", "Failure", "explain", "settings_source"]


class ExitCode:
    """Exit codes shared by every command (sysexits.h where one fits)."""

    OK = 0
    FAILED = 1  # a job failed, or a request was refused (bad value, missing object or bucket)
    CANCELLED = 2  # the job was cancelled (wait, submit --wait); click also exits 2 on a usage error
    TIMEOUT = 3  # --timeout passed before the job ended
    UNAVAILABLE = 69  # Redis or the S3 server cannot be reached (services not running?)
    NO_PERMISSION = 77  # Redis or S3 refused the credentials
    INTERRUPTED = 130  # Ctrl-C


_BAD_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
                    "ExpiredToken", "403"}


class Failure(NamedTuple):
    message: str
    exit_code: int


def settings_source() -> str:
    """Where this process looked for its connection settings, in words (one clause)."""
    state_dir = Path(os.environ.get("DARKROOM_STATE_DIR") or DEFAULT_STATE_DIR)
    env_file = (state_dir / "services.env").absolute()
    if os.environ.get("DARKROOM_REDIS_URL"):
        return "settings from DARKROOM_* environment variables"
    if env_file.is_file():
        return f"settings from {env_file}"
    return (f"no DARKROOM_REDIS_URL and no {env_file} (settings are looked for in ./{state_dir} "
            "relative to the current directory)")


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
    if isinstance(exc, StorageError) and not isinstance(exc, ObjectNotFoundError):
        code = getattr(exc, "aws_code", "")
        if code in _BAD_CREDENTIALS:
            return Failure(f"the S3 server refused the credentials ({code}; {settings_source()}): check "
                           "DARKROOM_S3_ACCESS_KEY_ID and DARKROOM_S3_SECRET_ACCESS_KEY", ExitCode.NO_PERMISSION)
    if isinstance(exc, TransientError) and _caused_by(exc, "NoCredentialsError"):
        return Failure(f"no S3 credentials ({settings_source()}): start the services with 'darkroom services up' "
                       "or set DARKROOM_S3_ACCESS_KEY_ID and DARKROOM_S3_SECRET_ACCESS_KEY", ExitCode.NO_PERMISSION)
    if isinstance(exc, TransientError) and _caused_by(exc, "EndpointConnectionError", "ConnectTimeoutError"):
        return Failure(f"cannot reach the S3 server ({settings_source()}). Start the services with "
                       "'darkroom services up', or set DARKROOM_S3_ENDPOINT_URL", ExitCode.UNAVAILABLE)
    if isinstance(exc, DarkroomError):
        return Failure(_first_line(exc), ExitCode.FAILED)
    return None


def _caused_by(exc: BaseException, *names: str) -> bool:
    cause = exc.__cause__
    while cause is not None:
        if {c.__name__ for c in type(cause).__mro__} & set(names):
            return True
        cause = cause.__cause__
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
