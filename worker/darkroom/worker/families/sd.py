"""Stable Diffusion 1.x and 2.x (``StableDiffusionImg2ImgPipeline``): the common call, nothing more."""

from __future__ import annotations

from darkroom.common.families import Family

from .base import FamilyCall

__all__ = ["SD"]


class _SD(FamilyCall):
    family = Family.SD


SD = _SD()
