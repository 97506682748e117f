"""Flux.1 (``FluxImg2ImgPipeline``): a CLIP and a T5 text encoder, guidance distilled into the model.

``guidance_scale`` is the distilled guidance the transformer is conditioned on (no classifier-free
guidance, so no negative prompt); ``prompt_2`` goes to T5 and defaults to ``prompt``. Flux sizes its
latents from ``height``/``width`` (1024 when absent), so the call names the input's size.
"""

from __future__ import annotations

from typing import Any

from darkroom.common.families import Family

from .base import Row, TransformerFamilyCall, per_row

__all__ = ["FLUX"]


class _Flux(TransformerFamilyCall):
    family = Family.FLUX
    # diffusers 0.42's Flux converter assumes the full Flux.1 width (3072) and Flux files usually hold the
    # transformer alone (no VAE, no text encoders), so a file and a config folder do not make a pipeline here.
    single_file_refusal = (
        "single-file Flux checkpoints are not loaded (diffusers converts only full-width Flux.1 transformers, "
        "and Flux files usually lack the VAE and text encoders); use a diffusers folder as the source instead "
        "(for a Flux transformer file: FluxTransformer2DModel.from_single_file(FILE, config=FLUX_FOLDER, "
        "subfolder='transformer'), then FluxPipeline.from_pretrained(FLUX_FOLDER, transformer=it)"
        ".save_pretrained(NEW_FOLDER))"
    )

    def text(self, rows: list[Row]) -> dict[str, Any]:
        prompts = [row.prompt for row in rows]
        return {"prompt": prompts, "prompt_2": per_row(rows, "prompt_2", prompts)}


FLUX = _Flux()
