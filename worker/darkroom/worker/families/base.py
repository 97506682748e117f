"""What every family module provides (:class:`FamilyCall`), and the per-image row a batch is made of."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from darkroom.common.families import Family
from darkroom.common.jobs import Img2ImgJob

__all__ = ["FamilyCall", "Row", "TransformerFamilyCall", "per_row"]


@dataclass(frozen=True)
class Row:
    """One output image of a batched call: its job, prompt and negative prompt ("" when none)."""

    job: Img2ImgJob
    prompt: str
    negative: str


def per_row(rows: list[Row], field: str, fallback: list[str]) -> list[str]:
    """A per-image list of the jobs' ``field`` (a text), each falling back to that row's ``fallback``."""
    return [getattr(row.job, field) or default for row, default in zip(rows, fallback, strict=True)]


class FamilyCall:
    """The family's part of a pipeline call. Subclasses override what their pipeline takes."""

    family: Family = Family.SD
    latent_cache = True  # whether the worker's VAE-latent cache applies (it needs :meth:`scale_latents` exact)
    upcast_vae = False  # the pipeline encodes its input with the VAE in float32 when the VAE asks (force_upcast)
    #: Why a single-file checkpoint of this family is refused, and what to use instead (None: it loads
    #: through diffusers' ``from_single_file`` with a local config folder, offline).
    single_file_refusal: str | None = None

    def text(self, rows: list[Row]) -> dict[str, Any]:
        """The call's text arguments, one entry per image row."""
        negatives = [row.negative for row in rows]
        return {"prompt": [row.prompt for row in rows], "negative_prompt": negatives if any(negatives) else None}

    def options(self, job: Img2ImgJob, size: tuple[int, int]) -> dict[str, Any]:
        """Family-specific arguments shared by the whole call (from the batch's first job; the batch key
        makes them equal); ``size`` is the input's (width, height)."""
        return {}

    def batch_key(self, job: Img2ImgJob) -> tuple[Any, ...]:
        """What, beyond the common batch key, jobs must share to run in one call."""
        return ()

    def encode_size(self, size: tuple[int, int]) -> dict[str, int]:
        """The size arguments the pipeline's ``image_processor.preprocess`` gets for an input of ``size``."""
        return {}

    def scale_latents(self, vae: Any, sample: Any, dtype: Any) -> Any:
        """The pipeline's initial latents from a VAE sample, exactly as its ``prepare_latents`` makes them
        (SD 1.x/2.x: ``scaling_factor * sample``)."""
        return vae.config.scaling_factor * sample


class TransformerFamilyCall(FamilyCall):
    """The transformer families (SD3, Flux): sized from ``height``/``width`` rather than from the image, a T5
    encoder whose sequence length a job may set, and latents shifted before they are scaled."""

    def options(self, job: Img2ImgJob, size: tuple[int, int]) -> dict[str, Any]:
        width, height = size
        options: dict[str, Any] = {"width": width, "height": height}
        if job.max_sequence_length is not None:
            options["max_sequence_length"] = job.max_sequence_length
        return options

    def encode_size(self, size: tuple[int, int]) -> dict[str, int]:
        return {"width": size[0], "height": size[1]}  # what the call names (see ``options``)

    def scale_latents(self, vae: Any, sample: Any, dtype: Any) -> Any:
        return (sample - vae.config.shift_factor) * vae.config.scaling_factor

    def batch_key(self, job: Img2ImgJob) -> tuple[Any, ...]:
        return (job.max_sequence_length,)
