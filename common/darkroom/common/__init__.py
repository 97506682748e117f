"""Darkroom's shared contract: job and result models, status, events, names, storage layout, errors.

Light by design: importing it never pulls torch or diffusers.
"""

from .errors import (
    ConfigurationError,
    DarkroomError,
    ErrorCode,
    FieldError,
    InvalidJobError,
    JobCancelled,
    JobError,
    JobFailed,
    TransientError,
    WaitTimeout,
    WorkerFatalError,
)
from .events import EventType, JobEvent
from .jobs import Img2ImgJob, OutputFormat, ResizeMode, validate_job
from .jobstore import JobRecord, JobStore
from .queues import TASK_IMG2IMG, cold_queue, hot_queue
from .results import FailureDetails, JobResult, OutputImage, Timings
from .safety import SafetyAction, SafetyPolicy, SafetyVerdict
from .settings import Settings
from .status import JobStatus
from .storage import S3Uri
from .webhooks import WebhookVerificationError, verify

__all__ = [
    "ConfigurationError",
    "DarkroomError",
    "ErrorCode",
    "EventType",
    "FailureDetails",
    "FieldError",
    "Img2ImgJob",
    "InvalidJobError",
    "JobCancelled",
    "JobError",
    "JobEvent",
    "JobFailed",
    "JobRecord",
    "JobResult",
    "JobStatus",
    "JobStore",
    "OutputFormat",
    "OutputImage",
    "ResizeMode",
    "S3Uri",
    "SafetyAction",
    "SafetyPolicy",
    "SafetyVerdict",
    "Settings",
    "TASK_IMG2IMG",
    "Timings",
    "TransientError",
    "WaitTimeout",
    "WorkerFatalError",
    "cold_queue",
    "hot_queue",
    "validate_job",
    "verify",
    "WebhookVerificationError",
]
