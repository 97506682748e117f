"""One module per model family: how a batch of jobs maps onto that family's img2img pipeline call.

Everything else in the worker (routing, residency, batching, adapters, safety, leases, results) is
family-agnostic; :mod:`..inference.call` asks the family of the pipeline in hand for the call's text
arguments, its family-specific options and what must be equal for jobs to share a call.
"""

from __future__ import annotations

from typing import Any

from darkroom.common.errors import ErrorCode, JobError
from darkroom.common.families import Family, family_of_class, refused_fields
from darkroom.common.jobs import Img2ImgJob

from .base import FamilyCall, Row
from .flux import FLUX
from .sd import SD
from .sd3 import SD3
from .sdxl import SDXL

__all__ = ["CALLS", "FamilyCall", "Row", "call_for", "check_family", "check_single_file", "family_of_pipeline"]

CALLS: dict[Family, FamilyCall] = {Family.SD: SD, Family.SDXL: SDXL, Family.SD3: SD3, Family.FLUX: FLUX}


def family_of_pipeline(pipeline: Any) -> Family:
    """The family of a loaded pipeline (by its class; anything unknown is treated as SD 1.x/2.x)."""
    return family_of_class(type(pipeline).__name__) or Family.SD


def call_for(pipeline: Any) -> FamilyCall:
    return CALLS[family_of_pipeline(pipeline)]


def check_family(job: Img2ImgJob, family: Family) -> None:
    """Refuse (``invalid_job``) a field the model's family does not take (the SDK checks it first when the
    fleet's catalog knows the family)."""
    errors = refused_fields(job.model_dump(), family, job.model)
    if errors:
        raise JobError(ErrorCode.INVALID_JOB, "; ".join(str(e) for e in errors))


def check_single_file(family: Family, where: str) -> None:
    """Refuse (``ValueError``) a single-file checkpoint of a family that cannot load from one, saying what to use."""
    refusal = CALLS[family].single_file_refusal
    if refusal is not None:
        raise ValueError(f"{where} is a single-file {family.value} checkpoint: {refusal}")
