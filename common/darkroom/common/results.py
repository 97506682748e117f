"""What a finished job produced: the record written to ``result.json`` and kept in Redis."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["JobResult", "OutputImage", "Timings"]


class OutputImage(BaseModel):
    """One output image and how it was made."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int
    uri: str
    seed: int
    width: int
    height: int
    content_type: str
    nsfw: bool | None = Field(None, description="Safety flag; None until a checker ran.")


class Timings(BaseModel):
    """Seconds spent in each stage of the job on the worker (queue wait is from submit)."""

    model_config = ConfigDict(extra="forbid")

    queue_wait: float | None = None
    download: float = 0.0
    decode: float = 0.0
    model_load: float = 0.0
    adapters: float = 0.0
    inference: float = 0.0
    encode: float = 0.0
    upload: float = 0.0
    total: float = 0.0


class JobResult(BaseModel):
    """A succeeded job's record: outputs, seeds, safety flags, timings and effective parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str
    model: str
    outputs: list[OutputImage]
    result_uri: str
    parameters: dict[str, Any] = Field(description="Effective parameters: the job plus what the worker decided.")
    timings: Timings
    worker: str
    device: str
    attempt: int
    finished_at: datetime

    @property
    def uris(self) -> list[str]:
        return [o.uri for o in self.outputs]

    @property
    def seeds(self) -> list[int]:
        return [o.seed for o in self.outputs]

    @property
    def nsfw_content_detected(self) -> list[bool | None]:
        return [o.nsfw for o in self.outputs]
