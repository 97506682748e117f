"""Flux.1 (``FluxImg2ImgPipeline``): a CLIP and a T5 text encoder, guidance distilled into the model.

``guidance_scale`` is the distilled guidance the transformer is conditioned on (no classifier-free
guidance, so no negative prompt); ``prompt_2`` goes to T5 and defaults to ``prompt``. Flux sizes its
latents from ``height``/``width`` (1024 when absent), so the call names the input's size.
"""

from __future__ import annotations

from typing import Any

from darkroom.common.families import Family
from darkroom.common.jobs import Img2ImgJob

from .base import FamilyCall, Row, per_row, sized_with_t5

__all__ = ["FLUX"]


class _Flux(FamilyCall):
    family = Family.FLUX

    def text(self, rows: list[Row]) -> dict[str, Any]:
        prompts = [row.prompt for row in rows]
        return {"prompt": prompts, "prompt_2": per_row(rows, "prompt_2", prompts)}

    def options(self, job: Img2ImgJob, size: tuple[int, int]) -> dict[str, Any]:
        return sized_with_t5(job, size)

    def batch_key(self, job: Img2ImgJob) -> tuple[Any, ...]:
        return (job.max_sequence_length,)


FLUX = _Flux()
