"""Lifecycle events: published on Redis channels, and sent as webhooks to the jobs that ask for them."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from .status import JobStatus

__all__ = ["EventType", "JobEvent", "event_channel", "ALL_EVENTS_CHANNEL"]

ALL_EVENTS_CHANNEL = "darkroom:events"


def event_channel(job_id: str) -> str:
    """The Redis pub/sub channel that carries one job's events."""
    return f"darkroom:events:{job_id}"


class EventType(StrEnum):
    QUEUED = "queued"
    STARTED = "started"
    PROGRESS = "progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @classmethod
    def for_status(cls, status: JobStatus) -> EventType:
        return cls(status.value)


class JobEvent(BaseModel):
    """Something happened to a job. Progress events carry ``step`` of ``total_steps``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: EventType
    job_id: str
    status: JobStatus
    time: datetime
    attempt: int = 0
    worker: str | None = None
    step: int | None = None
    total_steps: int | None = None
    error_code: str | None = None
    error_message: str | None = None
