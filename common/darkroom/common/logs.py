"""Logging for Darkroom processes: readable text by default, JSON lines for fleets.

Every line carries the process's identity (worker or dispatcher name) and, while a job is being
handled, its job id (set with :func:`job_context`). ``DARKROOM_LOG_FORMAT=json`` picks JSON.
"""

from __future__ import annotations

import contextvars
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

__all__ = ["configure_logging", "job_context", "JsonFormatter"]

_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("darkroom_job_id", default=None)


@contextmanager
def job_context(job_id: str | None) -> Iterator[None]:
    """Tag every log line emitted inside with ``job_id``."""
    token = _job_id.set(job_id)
    try:
        yield
    finally:
        _job_id.reset(token)


class _Context(logging.Filter):
    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def filter(self, record: logging.LogRecord) -> bool:
        record.darkroom_process = self.process
        record.job_id = _job_id.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, process, job_id (and exc_info)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": getattr(record, "darkroom_process", None),
            "job_id": None if getattr(record, "job_id", "-") == "-" else record.job_id,  # type: ignore[attr-defined]
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, fmt: str, process: str) -> None:
    """Set up the root logger once per process (entrypoints only)."""
    handler = logging.StreamHandler()
    handler.addFilter(_Context(process))
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(darkroom_process)s job=%(job_id)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
