"""The pipeline call: a *list* of prepared jobs in, a list of images per job out.

Every job is expanded into one sample per output image, each with its own
generator (``seed + i``), so a job's images do not depend on what it is batched
with (diffusers' ``num_images_per_prompt`` pairs images and prompts oddly for
lists, so it stays 1). Generators live on the CPU so a seed means the same noise
on every device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from darkroom.common.errors import ErrorCode, JobError
from darkroom.common.jobs import Img2ImgJob
from darkroom.common.schedulers import SchedulerName

from .schedulers import accepts_eta, accepts_timesteps

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = ["WorkItem", "BatchKey", "BatchOutput", "batch_key", "check_call_options", "clip_skip_compat", "run_batch"]

StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class WorkItem:
    """A job ready for the pipeline: its decoded input and its seeds."""

    job: Img2ImgJob
    image: Image
    seeds: list[int]


@dataclass(frozen=True)
class BatchKey:
    """Jobs with equal keys can share one pipeline call."""

    model: str
    strength: float
    num_inference_steps: int
    guidance_scale: float
    size: tuple[int, int]
    scheduler: SchedulerName | None = None
    eta: float | None = None
    clip_skip: int | None = None
    timesteps: tuple[int, ...] | None = None


@dataclass(frozen=True)
class BatchOutput:
    """Each job's images in order, and the denoising steps the scheduler really ran.

    ``steps_run`` is usually ``int(num_inference_steps * strength)``; PNDM runs one more.
    """

    images: list[list[Image]]
    steps_run: int


def batch_key(item: WorkItem) -> BatchKey:
    job = item.job
    return BatchKey(job.model, job.strength, job.num_inference_steps, job.guidance_scale, item.image.size,
                    job.scheduler, job.eta, job.clip_skip, None if job.timesteps is None else tuple(job.timesteps))


def check_call_options(job: Img2ImgJob, pipeline: Any) -> None:
    """Refuse (``invalid_job``) options the pipeline's current scheduler or text encoder cannot honour."""
    scheduler = pipeline.scheduler
    name = type(scheduler).__name__
    if job.eta is not None and not accepts_eta(scheduler):
        raise JobError(ErrorCode.INVALID_JOB, f"eta={job.eta} needs a scheduler whose step takes eta (ddim); "
                                              f"this job runs {name}, which ignores it")
    if job.timesteps is not None and not accepts_timesteps(scheduler):
        raise JobError(ErrorCode.INVALID_JOB, f"timesteps={job.timesteps} needs a scheduler that accepts "
                                              f"explicit timesteps (euler, dpmpp_2m, lcm); this job runs {name}")
    if job.clip_skip is None:
        return
    layers = int(getattr(getattr(pipeline.text_encoder, "config", None), "num_hidden_layers", 0) or 0)
    if layers and job.clip_skip >= layers:
        raise JobError(ErrorCode.INVALID_JOB, f"clip_skip={job.clip_skip} must be below this model's "
                                              f"{layers} text-encoder layers: 1 <= clip_skip <= {layers - 1}")
    clip_skip_compat(pipeline.text_encoder)


def clip_skip_compat(text_encoder: Any) -> None:
    """Let diffusers' clip_skip path find ``text_encoder.text_model.final_layer_norm``.

    transformers 5 flattened ``CLIPTextModel`` (``final_layer_norm`` sits on the model itself); diffusers
    0.42 still reaches for ``.text_model``. The alias is a plain attribute, not a registered submodule,
    so parameters, state dicts and adapters see nothing new.
    """
    if not hasattr(text_encoder, "text_model") and hasattr(text_encoder, "final_layer_norm"):
        object.__setattr__(text_encoder, "text_model", text_encoder)


def _call_options(job: Img2ImgJob, scheduler: Any) -> dict[str, Any]:
    """The optional pipeline arguments a job sets; none of them when it leaves them at their defaults."""
    options: dict[str, Any] = {}
    if job.eta is not None and accepts_eta(scheduler):
        options["eta"] = job.eta
    if job.clip_skip is not None:
        options["clip_skip"] = job.clip_skip
    if job.timesteps is not None:
        options["timesteps"] = list(job.timesteps)
    return options


def run_batch(pipeline: Any, items: Sequence[WorkItem], on_step: StepCallback | None = None) -> BatchOutput:
    """Run one pipeline call for batch-compatible ``items``; return each job's images in order."""
    import torch

    if not items:
        return BatchOutput([], 0)
    keys = {batch_key(item) for item in items}
    if len(keys) != 1:
        raise ValueError(f"items are not batch-compatible: {sorted(map(str, keys))}")
    first = items[0].job
    prompts: list[str] = []
    negatives: list[str] = []
    images: list[Image] = []
    generators: list[torch.Generator] = []
    for item in items:
        job_negatives = item.job.negative_prompts() or [""] * len(item.seeds)
        for prompt, negative, seed in zip(item.job.prompts(), job_negatives, item.seeds, strict=True):
            prompts.append(prompt)
            negatives.append(negative)
            images.append(item.image)
            generators.append(torch.Generator("cpu").manual_seed(seed))
    output = pipeline(
        prompt=prompts,
        negative_prompt=negatives if any(negatives) else None,
        image=images,
        strength=first.strength,
        num_inference_steps=first.num_inference_steps,
        guidance_scale=first.guidance_scale,
        generator=generators,
        num_images_per_prompt=1,
        output_type="pil",
        callback_on_step_end=_step_hook(on_step) if on_step else None,
        **_call_options(first, pipeline.scheduler),
    )
    results: list[list[Image]] = []
    cursor = 0
    for item in items:
        results.append(list(output.images[cursor : cursor + len(item.seeds)]))
        cursor += len(item.seeds)
    return BatchOutput(results, int(getattr(pipeline, "num_timesteps", 0) or 0))


def _step_hook(on_step: StepCallback) -> Callable[..., dict[str, Any]]:
    def hook(pipeline: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        on_step(step + 1, int(getattr(pipeline, "num_timesteps", 0) or 0))
        return kwargs

    return hook
