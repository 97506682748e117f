"""Worker settings: the shared ones plus what a GPU worker process needs."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from darkroom.common.safety import SafetyPolicy
from darkroom.common.settings import Settings

__all__ = ["WorkerSettings"]


class WorkerSettings(Settings):
    """``DARKROOM_*`` settings of a worker process."""

    models_file: Path | None = Field(None, description="Model registry (TOML); see the README.")
    models: dict[str, str] = Field(default_factory=dict, description='Extra models as JSON: {"id": "source"}.')
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps.")
    cpu_threads: int | None = Field(
        None, ge=1, description="torch CPU threads; set it when several workers share a CPU host (default: all)."
    )
    dtype: str = Field("auto", description="auto (fp16 on CUDA, fp32 on CPU), float32, float16 or bfloat16.")
    worker_name: str | None = Field(None, description="Defaults to darkroom-<host>-<pid>.")
    max_image_bytes: int = Field(25 * 1024 * 1024, ge=1, description="Input objects larger than this fail at once.")
    max_image_pixels: int = Field(2048 * 2048, ge=64, description="Decoded inputs with more pixels fail at once.")
    transient_retries: int = Field(
        8, ge=0, le=50, description="Retries of transient errors (backoff 1 s doubling to 60 s) before a job fails."
    )
    progress_interval_seconds: float = Field(0.5, ge=0.0, description="Minimum time between progress events.")
    heartbeat_seconds: float = Field(5.0, gt=0, description="How often the worker announces itself in Redis.")
    model_memory_budget_bytes: int | None = Field(
        None, ge=1, description="Bytes of model weights kept resident; auto: 70% of GPU memory or 50% of RAM."
    )
    max_adapters: int = Field(8, ge=1, le=256, description="LoRA adapters kept loaded per model (LRU).")
    lease_seconds: float = Field(
        10.0, ge=1.0, description="Job lease lifetime; a dead worker's job is taken over about this long after."
    )
    max_deliveries: int = Field(5, ge=1, description="Starts of one job before it goes to the dead-letter queue.")
    metrics_host: str = Field("127.0.0.1", description="Address of /metrics, /healthz and /readyz (0.0.0.0 in pods).")
    metrics_port: int = Field(9464, ge=0, le=65535, description="Port of the metrics server; 0 disables it.")
    fault_injection: bool = Field(False, description="Tests only: honour [[fault:...]] markers in prompts.")
    allow_pickle_weights: bool = Field(False, description="Allow non-safetensors (pickle) weights. Unsafe.")
    safety_checker: Literal["opennsfw", "diffusers", "none"] = Field(
        "opennsfw", description="Scores every output: opennsfw (Yahoo open_nsfw, nudity/porn), diffusers or none."
    )
    safety_model_dir: Path | None = Field(
        None, description="Folder with safety_checker/ and feature_extractor/ for the diffusers checker; "
                          "default: the first local registry model that has them.",
    )
    safety_threads: int = Field(1, ge=1, le=64, description="CPU threads of the opennsfw checker.")
    safety_threshold: float = Field(
        0.5, ge=0.0, le=1.0, description="Score at or above which an image is flagged (0 flags all, 1 none)."
    )
    safety_threshold_min: float = Field(0.0, ge=0.0, le=1.0, description="Lowest per-job safety_threshold allowed.")
    safety_threshold_max: float | None = Field(
        None, ge=0.0, le=1.0,
        description="Highest per-job safety_threshold allowed; default: DARKROOM_SAFETY_THRESHOLD "
                    "(jobs may be stricter, not laxer).",
    )
    safety_policy: SafetyPolicy = Field(
        SafetyPolicy.BLUR, description="What to do with a flagged image when the job does not say: flag, blur, block."
    )
    quarantine_prefix: str = Field(
        "s3://darkroom/quarantine",
        description="s3:// prefix for the originals of blurred and blocked images; keep it private.",
    )
