"""Model families: which diffusers img2img pipeline a model runs, and which job fields each family takes.

A registry entry's family comes from its ``model_index.json`` (``_class_name``) or is set explicitly. The
family decides only how a job maps onto a pipeline call (in the worker, one module per family); routing,
residency, batching, leases and results never look at it. Producers learn each model's family from the
fleet's catalog in Redis and refuse, at submit, a field the model's family does not take.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from .errors import FieldError

__all__ = ["Family", "family_of_class", "img2img_class", "family_fields", "refused_fields", "FAMILY_FIELDS",
           "SD_ONLY_FIELDS"]


class Family(StrEnum):
    SD = "sd"  # Stable Diffusion 1.x and 2.x (v-prediction 2.x included)
    SDXL = "sdxl"  # SDXL base and refiner
    SD3 = "sd3"  # Stable Diffusion 3 / 3.5
    FLUX = "flux"  # Flux.1 (dev, schnell)


# model_index.json's _class_name (any pipeline of the family) -> family
_CLASSES: dict[str, Family] = {
    "StableDiffusionPipeline": Family.SD, "StableDiffusionImg2ImgPipeline": Family.SD,
    "StableDiffusionXLPipeline": Family.SDXL, "StableDiffusionXLImg2ImgPipeline": Family.SDXL,
    "StableDiffusion3Pipeline": Family.SD3, "StableDiffusion3Img2ImgPipeline": Family.SD3,
    "FluxPipeline": Family.FLUX, "FluxImg2ImgPipeline": Family.FLUX,
}
_IMG2IMG: dict[Family, str] = {
    Family.SD: "StableDiffusionImg2ImgPipeline", Family.SDXL: "StableDiffusionXLImg2ImgPipeline",
    Family.SD3: "StableDiffusion3Img2ImgPipeline", Family.FLUX: "FluxImg2ImgPipeline",
}

# Job fields that only some families take (every other field is common to all).
FAMILY_FIELDS: dict[str, frozenset[Family]] = {
    "prompt_2": frozenset({Family.SDXL, Family.SD3, Family.FLUX}),
    "negative_prompt_2": frozenset({Family.SDXL, Family.SD3}),
    "prompt_3": frozenset({Family.SD3}),
    "negative_prompt_3": frozenset({Family.SD3}),
    "original_size": frozenset({Family.SDXL}),
    "target_size": frozenset({Family.SDXL}),
    "crops_coords_top_left": frozenset({Family.SDXL}),
    "aesthetic_score": frozenset({Family.SDXL}),
    "negative_aesthetic_score": frozenset({Family.SDXL}),
    "denoising_start": frozenset({Family.SDXL}),
    "denoising_end": frozenset({Family.SDXL}),
    "max_sequence_length": frozenset({Family.SD3, Family.FLUX}),
    # Flux is guidance-distilled: no classifier-free guidance, so no negative prompt
    "negative_prompt": frozenset({Family.SD, Family.SDXL, Family.SD3}),
}
# Features built on SD 1.x/2.x internals (UNet hooks, one CLIP text encoder, its VAE latents); other
# families refuse them until they have their own path.
SD_ONLY_FIELDS = ("prompt_embeds", "negative_prompt_embeds", "textual_inversions", "freeu", "ip_adapter_image",
                  "ip_adapter_scale", "clip_skip", "timesteps", "sigmas", "eta")
for _name in SD_ONLY_FIELDS:
    FAMILY_FIELDS[_name] = frozenset({Family.SD})
FAMILY_FIELDS["output_latents"] = frozenset({Family.SD, Family.SDXL})  # SD-style 4-channel VAE latents


def family_of_class(class_name: str) -> Family | None:
    """The family of a diffusers pipeline class name (``model_index.json``'s ``_class_name``); None if unknown."""
    return _CLASSES.get(class_name)


def img2img_class(family: Family) -> str:
    """The diffusers img2img pipeline class that runs ``family``."""
    return _IMG2IMG[family]


def family_fields(family: Family) -> list[str]:
    """The family-limited job fields ``family`` takes."""
    return sorted(name for name, families in FAMILY_FIELDS.items() if family in families)


def _is_set(name: str, value: Any) -> bool:
    if name == "output_latents":
        return bool(value)
    if name in ("adapters", "textual_inversions"):
        return bool(value)
    return value is not None


def refused_fields(job: Mapping[str, Any], family: Family, model: str) -> list[FieldError]:
    """A :class:`FieldError` for each field ``job`` sets that ``family`` does not take."""
    errors = []
    for name, families in FAMILY_FIELDS.items():
        if family not in families and _is_set(name, job.get(name)):
            errors.append(FieldError(
                name, job.get(name), f"model {model!r} is a {family.value} model, which does not take {name}",
                f"for {family.value}: the common fields" + (", " + ", ".join(family_fields(family))
                                                             if family_fields(family) else "")))
    return errors
