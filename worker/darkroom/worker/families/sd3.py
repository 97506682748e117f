"""Stable Diffusion 3 (``StableDiffusion3Img2ImgPipeline``): three text encoders (two CLIP, one T5).

``prompt_2``/``prompt_3`` (and their negatives) default to ``prompt``/``negative_prompt``, as in diffusers;
``max_sequence_length`` (the T5 tokens) applies to the whole call. SD3 sizes its output from
``height``/``width`` (its default sample size when absent), so the call names the input's size.
"""

from __future__ import annotations

from typing import Any

from darkroom.common.families import Family

from .base import Row, TransformerFamilyCall, per_row

__all__ = ["SD3"]


class _SD3(TransformerFamilyCall):
    family = Family.SD3

    def text(self, rows: list[Row]) -> dict[str, Any]:
        text = super().text(rows)
        text["prompt_2"] = per_row(rows, "prompt_2", text["prompt"])
        text["prompt_3"] = per_row(rows, "prompt_3", text["prompt"])
        if text["negative_prompt"] is not None:
            text["negative_prompt_2"] = per_row(rows, "negative_prompt_2", text["negative_prompt"])
            text["negative_prompt_3"] = per_row(rows, "negative_prompt_3", text["negative_prompt"])
        return text


SD3 = _SD3()
