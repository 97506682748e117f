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

from darkroom.common.jobs import Img2ImgJob

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = ["WorkItem", "BatchKey", "BatchOutput", "batch_key", "run_batch"]

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


@dataclass(frozen=True)
class BatchOutput:
    """Each job's images in order, and the denoising steps the scheduler really ran.

    ``steps_run`` is usually ``int(num_inference_steps * strength)``; PNDM runs one more.
    """

    images: list[list[Image]]
    steps_run: int


def batch_key(item: WorkItem) -> BatchKey:
    job = item.job
    return BatchKey(job.model, job.strength, job.num_inference_steps, job.guidance_scale, item.image.size)


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
        for seed in item.seeds:
            prompts.append(item.job.prompt)
            negatives.append(item.job.negative_prompt or "")
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
