"""What to tell a person when object storage cannot be used: which settings were looked for, and what to do.

Shared by the SDK (``Client.upload``, ``Client.download``, ...), which re-raises storage errors with
these messages, and by the command line (``cli_errors``), which prints them as one line.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ConfigurationError, DarkroomError, ObjectNotFoundError, StorageError
from .settings import DEFAULT_STATE_DIR

__all__ = ["BAD_CREDENTIALS", "caused_by", "friendly_storage", "settings_source", "storage_hint"]

#: S3 error codes that mean "these credentials are wrong" (403 when the server gives no code).
BAD_CREDENTIALS = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
                             "ExpiredToken", "403"})
_CREDENTIAL_VARIABLES = "DARKROOM_S3_ACCESS_KEY_ID and DARKROOM_S3_SECRET_ACCESS_KEY"


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


def caused_by(exc: BaseException, *names: str) -> bool:
    """Whether a botocore/redis exception named one of ``names`` is in ``exc``'s chain of causes."""
    cause = exc.__cause__
    while cause is not None:
        if {c.__name__ for c in type(cause).__mro__} & set(names):
            return True
        cause = cause.__cause__
    return False


def storage_hint(exc: BaseException, uri: str | None = None, *, writing: bool = False) -> str | None:
    """One line saying why object storage failed and what to do; None when ``exc`` is nothing we can explain.

    ``writing``: the request was a put, so "not found" means the bucket is missing.
    """
    if not isinstance(exc, DarkroomError):
        return None
    if caused_by(exc, "NoCredentialsError", "PartialCredentialsError"):
        return (f"no S3 credentials ({settings_source()}): start the services with 'darkroom services up' "
                f"(or work in the folder where you did), or set DARKROOM_S3_ENDPOINT_URL, {_CREDENTIAL_VARIABLES}")
    if isinstance(exc, StorageError) and getattr(exc, "aws_code", "") in BAD_CREDENTIALS:
        code = getattr(exc, "aws_code", "")
        return f"the S3 server refused the credentials ({code}; {settings_source()}): check {_CREDENTIAL_VARIABLES}"
    if caused_by(exc, "EndpointConnectionError", "ConnectTimeoutError"):
        return (f"cannot reach the S3 server ({settings_source()}). Start the services with "
                "'darkroom services up', or set DARKROOM_S3_ENDPOINT_URL")
    if writing and isinstance(exc, ObjectNotFoundError) and uri is not None:
        bucket = uri.removeprefix("s3://").split("/", 1)[0]
        return (f"bucket {bucket!r} does not exist: create it first, or upload to an existing bucket "
                "(the embedded services create 'darkroom')")
    return None


@contextmanager
def friendly_storage(uri: str, *, writing: bool = False) -> Iterator[None]:
    """Re-raise a storage error we can explain with :func:`storage_hint`'s message (same type, the original as
    its cause); no credentials at all becomes a ConfigurationError (retrying cannot help)."""
    try:
        yield
    except DarkroomError as exc:
        hint = storage_hint(exc, uri, writing=writing)
        if hint is None:
            raise
        if caused_by(exc, "NoCredentialsError", "PartialCredentialsError"):
            raise ConfigurationError(hint) from exc
        error = type(exc)(hint)
        error.__dict__.update(exc.__dict__)  # e.g. StorageError.aws_code
        raise error from exc
