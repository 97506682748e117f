"""Darkroom producer SDK: :class:`Client` submits img2img jobs; :class:`JobHandle` follows one.

:class:`AsyncClient` (``darkroom.producer.aio``) offers the same surface to asyncio code.

Installs and imports without torch or diffusers.
"""

from darkroom.common.errors import (
    InvalidJobError,
    JobCancelled,
    JobFailed,
    NotReplicated,
    RedisUnavailable,
    WaitTimeout,
)
from darkroom.common.events import EventType, JobEvent
from darkroom.common.jobs import Img2ImgJob, OutputFormat
from darkroom.common.jobstore import JobNotFound, JobRecord
from darkroom.common.results import JobResult
from darkroom.common.settings import Settings
from darkroom.common.status import JobStatus

from .aio import AsyncClient, AsyncJobHandle
from .client import Client, JobHandle

__all__ = [
    "AsyncClient",
    "AsyncJobHandle",
    "Client",
    "EventType",
    "Img2ImgJob",
    "InvalidJobError",
    "JobCancelled",
    "JobEvent",
    "JobFailed",
    "JobHandle",
    "JobNotFound",
    "JobRecord",
    "JobResult",
    "JobStatus",
    "NotReplicated",
    "OutputFormat",
    "RedisUnavailable",
    "Settings",
    "WaitTimeout",
]
