"""Webhooks: the outbox that status changes write to, in the same Redis transaction.

A job with a ``callback_url`` gets one outbox entry per event it wants. The
webhook dispatcher (its own process pool, never a GPU worker) delivers them.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

from .events import EventType, JobEvent

if TYPE_CHECKING:
    from .jobstore import JobRecord

__all__ = ["OUTBOX_KEY", "wants", "outbox_push"]

OUTBOX_KEY = "darkroom:webhooks:outbox"


def wants(record: JobRecord, event: JobEvent) -> bool:
    """Whether the job asked for this event at its callback URL."""
    job = record.job
    if not job.callback_url:
        return False
    return job.webhook_events is None or event.type in job.webhook_events


def outbox_push(pipe: Any, record: JobRecord, event: JobEvent) -> None:
    """Queue a delivery of ``event`` on ``pipe`` (a Redis pipeline of the same transition)."""
    if not wants(record, event):
        return
    entry = {
        "id": f"msg_{uuid.uuid4().hex}",
        "job_id": record.job_id,
        "url": record.job.callback_url,
        "producer": record.job.producer,
        "terminal": event.type in {EventType.SUCCEEDED, EventType.FAILED, EventType.CANCELLED},
        "event": json.loads(event.model_dump_json()),
        "result": json.loads(record.result.model_dump_json()) if record.result else None,
    }
    pipe.lpush(OUTBOX_KEY, json.dumps(entry))
