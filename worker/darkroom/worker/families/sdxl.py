"""SDXL base and refiner (``StableDiffusionXLImg2ImgPipeline``): two text encoders and micro-conditioning.

``prompt_2``/``negative_prompt_2`` go to the second text encoder (each defaults to its first-encoder
counterpart, as in diffusers). The size and crop conditioning, aesthetic scores (refiner) and the
ensemble-of-experts bounds ``denoising_start``/``denoising_end`` apply to the whole call, so they are part
of the batch key. With ``force_zeros_for_empty_prompt`` a job without a negative prompt is conditioned
on zeros, not on an empty prompt: jobs with and without negative prompts never share a call.
"""

from __future__ import annotations

from typing import Any

from darkroom.common.families import Family
from darkroom.common.jobs import Img2ImgJob

from .base import FamilyCall, Row, per_row

__all__ = ["SDXL"]

_CALL_FIELDS = ("original_size", "target_size", "crops_coords_top_left", "aesthetic_score",
                "negative_aesthetic_score", "denoising_start", "denoising_end")


class _SDXL(FamilyCall):
    family = Family.SDXL
    upcast_vae = True

    def scale_latents(self, vae: Any, sample: Any, dtype: Any) -> Any:
        import torch

        sample = sample.to(dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(device=sample.device, dtype=dtype)
            std = torch.tensor(std).view(1, 4, 1, 1).to(device=sample.device, dtype=dtype)
            return (sample - mean) * vae.config.scaling_factor / std
        return vae.config.scaling_factor * sample

    def text(self, rows: list[Row]) -> dict[str, Any]:
        text = super().text(rows)
        text["prompt_2"] = per_row(rows, "prompt_2", text["prompt"])
        if text["negative_prompt"] is not None:
            text["negative_prompt_2"] = per_row(rows, "negative_prompt_2", text["negative_prompt"])
        return text

    def options(self, job: Img2ImgJob, size: tuple[int, int]) -> dict[str, Any]:
        return {name: getattr(job, name) for name in _CALL_FIELDS if getattr(job, name) is not None}

    def batch_key(self, job: Img2ImgJob) -> tuple[Any, ...]:
        return (*(getattr(job, name) for name in _CALL_FIELDS), bool(job.negative_prompts()))


SDXL = _SDXL()
