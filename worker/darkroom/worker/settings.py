"""Worker settings: the shared ones plus what a GPU worker process needs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from darkroom.common.safety import SafetyPolicy
from darkroom.common.settings import Settings, comma_list

__all__ = ["WorkerSettings"]


class WorkerSettings(Settings):
    """``DARKROOM_*`` settings of a worker process."""

    models_file: Path | None = Field(None, description="Model registry (TOML); see the models guide (docs/guides/models.md).")
    models: dict[str, str] = Field(default_factory=dict, description='Extra models as JSON: {"id": "source"}.')
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps.")
    cpu_threads: int | None = Field(
        None, ge=1, description="torch CPU threads; set it when several workers share a CPU host (default: all)."
    )
    dtype: str = Field("auto", description="auto (fp16 on CUDA, fp32 on CPU), float32, float16 or bfloat16 "
                                           "(float16 is refused on CPU); a registry model's dtype overrides it.")
    attention: Literal["sdpa", "xformers", "slicing"] = Field(
        "sdpa", description="Attention kernel: sdpa (torch scaled_dot_product_attention), xformers (CUDA, when "
                            "installed) or slicing (less memory, slower).",
    )
    vae_slicing: bool = Field(False, description="Decode a batch's latents one image at a time (less memory).")
    vae_tiling: bool = Field(False, description="Encode and decode large images in overlapping tiles (less memory; "
                                                "seams possible).")
    fuse_qkv: bool = Field(False, description="Fuse attention q/k/v projections (UNet, VAE); needs attention sdpa "
                                              "and models without adapters.")
    channels_last: bool = Field(False, description="Keep the UNet in channels-last memory format (faster convs on "
                                                   "many GPUs).")
    compile: bool = Field(False, description="torch.compile the denoiser (slow first job per shape); checked at "
                                             "start-up; adapters are then held in slots (DARKROOM_ADAPTER_LAYERS).")
    cpu_offload: Literal["none", "model", "sequential"] = Field(
        "none", description="Keep weights in CPU memory for small GPUs: model (one model on the GPU at a time) or "
                            "sequential (layer by layer, slowest); CUDA only.",
    )
    worker_name: str | None = Field(None, description="Defaults to darkroom-<host>-<pid>.")
    max_image_bytes: int = Field(25 * 1024 * 1024, ge=1, description="Input objects larger than this fail at once.")
    max_image_pixels: int = Field(2048 * 2048, ge=64, description="Decoded inputs (and resized working images) with more pixels "
                                                                "fail at once.")
    transient_retries: int = Field(
        8, ge=0, le=10_000,
        description="Retries of transient errors (backoff 1 s doubling to 60 s) before a job fails; counted in the "
                    "job's record.",
    )
    retry_backoff_seconds: float = Field(
        1.0, gt=0, description="First transient-retry delay; it doubles per retry up to retry_backoff_cap_seconds "
                               "(equal jitter).",
    )
    retry_backoff_cap_seconds: float = Field(60.0, gt=0, description="Longest transient-retry delay.")
    progress_interval_seconds: float = Field(0.5, ge=0.0, description="Minimum time between progress events.")
    heartbeat_seconds: float = Field(5.0, gt=0, description="How often the worker announces itself in Redis.")
    fair_share_depth: int = Field(
        2, ge=1, le=1000, description="Held bulk jobs (fair share) are released onto a model's queue while it "
                                      "holds fewer than this many bulk messages.",
    )
    fair_share_interval_seconds: float = Field(
        0.1, gt=0, le=10, description="How often the worker releases held bulk jobs of the models it serves.",
    )
    assist: bool = Field(
        True, description="An idle worker with free memory budget joins the holders of a model whose hot queue "
                          "(plus held bulk work) is at least assist_queue_depth deep (docs: Scaling).",
    )
    assist_queue_depth: int = Field(
        4, ge=1, le=100_000, description="Waiting messages of one model, not yet reserved by a holder, per idle "
                                         "worker that comes to help with it (fewer helpers where the holders' "
                                         "load and per-image times say the backlog drains before a load ends).",
    )
    assist_work_per_load: float = Field(
        1.0, gt=0, le=100, description="Work, in model-load times, that each worker of a model (holders and "
                                       "helpers) should get from its backlog: helpers stop coming once the "
                                       "backlog's pipeline seconds, shared out, fall below this many loads. "
                                       "Lower: more idle workers load the model and a flood drains sooner, with "
                                       "more loads per job.",
    )
    assist_interval_seconds: float = Field(
        2.0, gt=0, le=600, description="How often an idle worker looks for a model to assist with.",
    )
    assist_load_first: bool = Field(
        False, description="A worker that comes to help with a model loads it first, beside its engine, and takes "
                           "the model's jobs only once it is resident: almost no job waits for a load, but small "
                           "floods drain more slowly, since the holders reserve what the helpers would have taken "
                           "(docs: Scaling). False: it takes a call's worth of jobs at once and its first job loads "
                           "the model. Only with load_beside (eager workers).",
    )
    assist_hold_seconds: float = Field(
        30.0, gt=0, le=3600, description="How long a worker helping with a model it does not hold yet consumes "
                                         "the model's hot queue without receiving a job before it stops.",
    )
    model_memory_budget_bytes: int | None = Field(
        None, ge=1, description="Bytes of model weights kept resident; auto: 70% of GPU memory or 50% of RAM."
    )
    batch_max_images: int = Field(
        8, ge=1, le=256, description="Images per pipeline call when compatible jobs are queued; 1 turns batching off."
    )
    batch_max_wait_ms: float = Field(
        20.0, ge=0.0, le=60_000.0,
        description="Longest a job waits for compatible jobs to join its call (only while others are being "
                    "prepared).",
    )
    batch_max_pixels: int | None = Field(
        None, ge=64, description="Pixels (width x height x images) per call; bounds a batch's device memory. "
                                 "Default: no bound beyond batch_max_images.",
    )
    interactive_hold_ms: float = Field(
        500.0, ge=0.0, le=60_000.0,
        description="After a pipeline call, while interactive jobs wait in a queue this worker reads, how long a "
                    "ready bulk batch waits for one of them to arrive (the call's task slots free as its outputs "
                    "upload) so that it runs first; 0: bulk batches never wait.",
    )
    load_beside: bool = Field(
        True,
        description="Load a model on its own thread while the engine keeps serving the resident ones (one load "
                    "at a time; a model in a call is evicted once the call ends). Compiled workers "
                    "(DARKROOM_COMPILE) always load on the engine thread.",
    )
    task_slots: int | None = Field(
        None, ge=1, le=512,
        description="Messages a worker holds at once (Celery thread pool): jobs being fetched/decoded, waiting "
                    "for or in the pipeline, being encoded/uploaded. Default: 2 x batch_max_images (min 2).",
    )
    latent_cache_bytes: int = Field(
        256 * 1024 * 1024, ge=0,
        description="Bytes of VAE encodings of inputs kept for reuse across a source's variants; 0 disables.",
    )
    max_adapter_bytes: int = Field(
        2 * 1024**3, ge=1, description="Largest LoRA or textual-inversion file a job may name; larger ones fail "
                                       "the job before the download ends.",
    )
    file_cache_bytes: int = Field(
        64 * 1024**3, ge=0, description="Bytes of downloaded models and adapters kept on disk (shared by a host's "
                                        "workers); past it the least recently used go. 0: no bound.",
    )
    max_adapters: int = Field(8, ge=1, le=256, description="LoRA adapters kept loaded per model (LRU).")
    adapter_layers: Literal["auto", "peft", "slots"] = Field(
        "auto", description="How LoRA layers run: peft (one module per adapter, switched in Python), slots (every "
                            "adapter in fixed stacked buffers with per-sample weights: no recompiles, any mix in "
                            "one call; no DoRA); auto: slots when DARKROOM_COMPILE is on, else peft.",
    )
    compile_warmup_sizes: Annotated[list[str], NoDecode] = Field(
        ["512x512"], description="With DARKROOM_COMPILE: image sizes (WIDTHxHEIGHT) each model is compiled for as "
                                 "it loads (preloaded models: before /readyz), at every batch size up to "
                                 "DARKROOM_BATCH_MAX_IMAGES, the batch size being a dynamic dimension; another "
                                 "size compiles once more (counted in darkroom_recompiles_total).",
    )
    lora_max_rank: int = Field(
        16, ge=1, le=512, description="With adapter slots: the largest LoRA rank a slot holds (lower ranks are "
                                      "padded; higher ones fail adapter_invalid). Slots x rank is the width of "
                                      "the extra product on every adapted layer.",
    )
    mixed_adapters: bool = Field(
        True, description="Batch jobs that differ only in their LoRA adapters into one call, each sample routed to "
                          "its own adapters; false: only jobs with identical adapter sets share a call.",
    )
    lease_seconds: float = Field(
        10.0, ge=1.0, description="Job lease lifetime; a dead worker's job is taken over about this long after."
    )
    max_deliveries: int = Field(
        5, ge=1, le=10_000,
        description="Attempts of one job that end without an outcome (their worker lost mid-job) before it goes to "
                    "the dead-letter store.",
    )
    max_unexpected_failures: int = Field(
        3, ge=1, le=1000,
        description="Deliveries of one job that break outside the job (e.g. Redis lost mid-delivery) before it goes "
                    "to the dead-letter store.",
    )
    reconcile_interval_seconds: float = Field(
        30.0, gt=0, description="How often the fleet looks for queued or started jobs whose message is gone, and "
                                "enqueues them again: one worker sweeps when the fleet's last sweep began at least "
                                "this long ago (its own setting).",
    )
    reconcile_grace_seconds: float = Field(
        60.0, gt=0, description="How long a queued or started job may go unchanged, with no lease and no message, "
                                "before the reconciler enqueues it again.",
    )
    job_time_base_seconds: float = Field(
        120.0, gt=0, description="Run-time limit of a job: this plus job_time_factor x steps x megapixels x images "
                                 "(capped at job_time_ceiling_seconds); past it the job fails 'timeout'.",
    )
    job_time_factor: float = Field(
        5.0, ge=0, description="Seconds allowed per denoising step per megapixel per image (see job_time_base_seconds).",
    )
    job_time_ceiling_seconds: float = Field(3600.0, gt=0, description="The longest any job may run.")
    engine_stall_seconds: float = Field(
        600.0, gt=0, description="A worker whose engine made no denoising step for this long while it had work, "
                                 "or whose model load beside the engine ran this long, is recycled (exit 75, "
                                 "restarted by its supervisor).",
    )
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

    @field_validator("compile_warmup_sizes", mode="before")
    @classmethod
    def _split_sizes(cls, value: Any) -> Any:
        return comma_list(value)

    @field_validator("compile_warmup_sizes")
    @classmethod
    def _check_sizes(cls, value: list[str]) -> list[str]:
        for entry in value:
            match = re.fullmatch(r"(\d+)x(\d+)", entry)
            if match is None or not all(8 <= int(side) <= 4096 and int(side) % 8 == 0 for side in match.groups()):
                raise ValueError(f"compile_warmup_sizes entry {entry!r} is not WIDTHxHEIGHT (multiples of 8, "
                                 "8..4096), e.g. 512x512,768x768")
        return value

    @property
    def warmup_sizes(self) -> tuple[tuple[int, int], ...]:
        """``compile_warmup_sizes`` as (width, height) pairs."""
        return tuple((int(w), int(h)) for w, h in (entry.split("x") for entry in self.compile_warmup_sizes))

    @property
    def slots(self) -> int:
        """Task slots: ``task_slots`` or enough to prepare one batch while another runs."""
        return self.task_slots or max(2, 2 * self.batch_max_images)
