"""Worker settings: the shared ones plus what a GPU worker process needs."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from darkroom.common.settings import Settings

__all__ = ["WorkerSettings"]


class WorkerSettings(Settings):
    """``DARKROOM_*`` settings of a worker process."""

    models_file: Path | None = Field(None, description="Model registry (TOML); see the README.")
    models: dict[str, str] = Field(default_factory=dict, description='Extra models as JSON: {"id": "source"}.')
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps.")
    dtype: str = Field("auto", description="auto (fp16 on CUDA, fp32 on CPU), float32, float16 or bfloat16.")
    worker_name: str | None = Field(None, description="Defaults to darkroom-<host>-<pid>.")
    max_image_bytes: int = Field(25 * 1024 * 1024, ge=1, description="Input objects larger than this fail at once.")
    max_image_pixels: int = Field(2048 * 2048, ge=64, description="Decoded inputs with more pixels fail at once.")
    transient_retries: int = Field(5, ge=0, le=50, description="Retries of transient errors before a job fails.")
    progress_interval_seconds: float = Field(0.5, ge=0.0, description="Minimum time between progress events.")
    heartbeat_seconds: float = Field(5.0, gt=0, description="How often the worker announces itself in Redis.")
    model_memory_budget_bytes: int | None = Field(
        None, ge=1, description="Bytes of model weights kept resident; auto: 70% of GPU memory or 50% of RAM."
    )
    max_adapters: int = Field(8, ge=1, le=256, description="LoRA adapters kept loaded per model (LRU).")
    allow_pickle_weights: bool = Field(False, description="Allow non-safetensors (pickle) weights. Unsafe.")
