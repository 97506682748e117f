"""What a finished job produced: the record written to ``result.json`` and kept in Redis."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .safety import SafetyAction, SafetyVerdict

__all__ = ["FailureDetails", "JobResult", "OutputImage", "Timings"]


class OutputImage(BaseModel):
    """One output image and how it was made."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    index: int
    uri: str | None = Field(description="The public object (the blurred copy when blurred); None when blocked.")
    seed: int
    width: int
    height: int
    content_type: str
    nsfw: bool | None = Field(None, description="Safety flag (safety.flagged); None when no checker ran.")
    safety: SafetyVerdict | None = Field(None, description="Checker, version, score, threshold, flag and action.")
    quarantine_uri: str | None = Field(
        None, description="The original under the worker's quarantine prefix, when blurred or blocked."
    )
    thumbnail_uri: str | None = Field(
        None, description="A small WebP of the public image beside it (for dashboards); None when blocked."
    )
    latents_uri: str | None = Field(
        None, description="Its final latents as safetensors (tensor 'latents'), when the job set output_latents."
    )
    sha256: str | None = Field(
        None, description="SHA-256 of the public object's bytes (hex); objects are never overwritten."
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        action = self.safety.action if self.safety is not None else SafetyAction.NONE
        if self.safety is not None and self.nsfw != self.safety.flagged:
            raise ValueError(f"nsfw={self.nsfw} contradicts safety.flagged={self.safety.flagged}")
        if (self.uri is None) != (action is SafetyAction.BLOCKED):
            raise ValueError(f"uri={self.uri!r} contradicts safety action {action.value!r}")
        if self.uri is None and self.thumbnail_uri is not None:
            raise ValueError(f"thumbnail_uri={self.thumbnail_uri!r} given for an output without a public image")
        if (self.quarantine_uri is not None) != action.quarantines:
            raise ValueError(f"quarantine_uri={self.quarantine_uri!r} contradicts safety action {action.value!r}")
        return self


class Timings(BaseModel):
    """Seconds spent in each stage of the job on the worker (queue wait is from submit)."""

    model_config = ConfigDict(extra="ignore")

    queue_wait: float | None = None
    batch_wait: float = Field(0.0, description="Waiting for compatible jobs and for the pipeline (the call before).")
    download: float = 0.0
    decode: float = 0.0
    model_load: float = 0.0
    adapters: float = 0.0
    inference: float = 0.0
    safety: float = 0.0
    encode: float = 0.0
    upload: float = 0.0
    total: float = 0.0


class JobResult(BaseModel):
    """A succeeded job's record: outputs, seeds, safety flags, timings and effective parameters."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    job_id: str
    model: str
    outputs: list[OutputImage]
    result_uri: str
    parameters: dict[str, Any] = Field(description="Effective parameters: the job plus what the worker decided.")
    input_safety: SafetyVerdict | None = Field(None, description="The input precheck's verdict, when asked for.")
    timings: Timings
    worker: str
    device: str
    attempt: int
    submission: str = Field("", description="The submission this result belongs to (with attempt: its fence).")
    finished_at: datetime

    @property
    def uris(self) -> list[str]:
        """The public output URIs; blocked images have none and are skipped."""
        return [o.uri for o in self.outputs if o.uri is not None]

    @property
    def seeds(self) -> list[int]:
        return [o.seed for o in self.outputs]

    @property
    def nsfw_content_detected(self) -> list[bool | None]:
        return [o.nsfw for o in self.outputs]


class FailureDetails(BaseModel):
    """What a failed job had done when it stopped: its timings so far and, if checked, the input's verdict."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    timings: Timings = Field(description="Seconds spent per stage up to the failure (inference 0: no denoising).")
    input_safety: SafetyVerdict | None = Field(None, description="The input precheck's verdict, when it ran.")
