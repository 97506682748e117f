"""Scheduler names a job may ask for, and what each accepts (no diffusers import here).

The worker maps each name to a diffusers scheduler class and config overrides
(``darkroom.worker.schedulers``); a unit test checks the capability sets below
against diffusers' own signatures, so submit-time refusals match what the worker
would do.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["SchedulerName", "SCHEDULER_CLASSES", "ACCEPTS_ETA", "ACCEPTS_TIMESTEPS", "ACCEPTS_SIGMAS"]


class SchedulerName(StrEnum):
    """A denoising scheduler, swapped in per job from the model's own scheduler config."""

    DDIM = "ddim"
    PNDM = "pndm"
    LMS = "lms"
    EULER = "euler"
    EULER_A = "euler_a"
    DPMPP_2M = "dpmpp_2m"
    DPMPP_2M_KARRAS = "dpmpp_2m_karras"
    UNIPC = "unipc"
    LCM = "lcm"


#: name -> (diffusers class, config overrides), as documented in the README.
SCHEDULER_CLASSES: dict[SchedulerName, tuple[str, dict[str, object]]] = {
    SchedulerName.DDIM: ("DDIMScheduler", {}),
    SchedulerName.PNDM: ("PNDMScheduler", {}),
    SchedulerName.LMS: ("LMSDiscreteScheduler", {}),
    SchedulerName.EULER: ("EulerDiscreteScheduler", {}),
    SchedulerName.EULER_A: ("EulerAncestralDiscreteScheduler", {}),
    SchedulerName.DPMPP_2M: ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    SchedulerName.DPMPP_2M_KARRAS: (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    SchedulerName.UNIPC: ("UniPCMultistepScheduler", {}),
    SchedulerName.LCM: ("LCMScheduler", {}),
}

#: Schedulers whose ``step`` takes ``eta``.
ACCEPTS_ETA = frozenset({SchedulerName.DDIM})

#: Schedulers whose ``set_timesteps`` takes explicit ``timesteps`` (Karras sigmas refuse them).
ACCEPTS_TIMESTEPS = frozenset({SchedulerName.EULER, SchedulerName.DPMPP_2M, SchedulerName.LCM})

#: Schedulers whose ``set_timesteps`` takes explicit ``sigmas`` (UniPC only with flow-matching sigmas, which
#: Stable Diffusion's configs do not use).
ACCEPTS_SIGMAS = frozenset({SchedulerName.EULER})
