"""Per-job img2img parameters: refusals name field, value and rule; the scheduler table matches diffusers."""

from __future__ import annotations

import pytest

from darkroom.common.errors import InvalidJobError
from darkroom.common.jobs import validate_job
from darkroom.common.schedulers import ACCEPTS_ETA, ACCEPTS_SIGMAS, ACCEPTS_TIMESTEPS, SchedulerName
from darkroom.worker.schedulers import (
    SchedulerSwitch,
    accepts_eta,
    accepts_sigmas,
    accepts_timesteps,
    build_scheduler,
)

BASE = {"model": "tiny", "image": "s3://darkroom/inputs/cat.png", "prompt": "a cat"}


def refused(**fields: object) -> InvalidJobError:
    with pytest.raises(InvalidJobError) as info:
        validate_job({**BASE, **fields})
    return info.value


@pytest.mark.parametrize(
    ("fields", "field", "allowed"),
    [
        ({"scheduler": "karras_magic"}, "scheduler", "one of ddim, pndm, lms, euler, euler_a, dpmpp_2m"),
        ({"eta": -0.1}, "eta", "0.0 <= eta <= 1.0"),
        ({"eta": 0.5, "scheduler": "euler"}, "eta", "eta only with scheduler ddim"),
        ({"clip_skip": 0}, "clip_skip", "1 <= clip_skip <= 24"),
        ({"timesteps": [500, 700, 100]}, "timesteps", "strictly descending integers"),
        ({"timesteps": [500, 500]}, "timesteps", "strictly descending integers"),
        ({"timesteps": [1000, 10]}, "timesteps.0", "strictly descending integers in 0..999"),
        ({"timesteps": [900, 500], "scheduler": "ddim"}, "timesteps", "timesteps only with scheduler dpmpp_2m, euler, lcm"),
        ({"timesteps": [900, 500], "scheduler": "dpmpp_2m_karras"}, "timesteps", "timesteps only with scheduler"),
        ({"timesteps": [900], "strength": 0.5, "scheduler": "euler"}, "timesteps", "int(len(timesteps) * strength) >= 1"),
        ({"sigmas": [3.0, 5.0], "scheduler": "euler"}, "sigmas", "strictly descending numbers"),
        ({"sigmas": [5.0, 3.0], "scheduler": "ddim"}, "sigmas", "sigmas only with scheduler euler"),
        ({"sigmas": [5.0, 3.0], "timesteps": [900, 500], "scheduler": "euler"}, "sigmas", "one of timesteps and sigmas"),
        ({"seed": [1, 2, 3], "num_images_per_prompt": 2}, "seed", "len(seed) == num_images_per_prompt (2)"),
        ({"seed": [1, -2], "num_images_per_prompt": 2}, "seed.1", "0 <= seed <="),
        ({"prompt": ["a", "b"]}, "prompt", "len(prompt) == num_images_per_prompt (1)"),
        ({"negative_prompt": ["a"], "num_images_per_prompt": 3}, "negative_prompt",
         "len(negative_prompt) == num_images_per_prompt (3)"),
    ],
)
def test_a_bad_value_is_refused_with_field_value_and_rule(fields: dict[str, object], field: str, allowed: str) -> None:
    error = refused(**fields)
    assert [e.field for e in error.errors] == [field]
    assert allowed in (error.errors[0].allowed or "")
    assert f"{field}=" in str(error)


def test_lists_give_one_seed_and_prompt_per_image() -> None:
    job = validate_job({**BASE, "num_images_per_prompt": 2, "seed": [7, 3], "prompt": ["a", "b"],
                        "negative_prompt": "blurry"})
    assert job.seeds() == [7, 3] and job.prompts() == ["a", "b"] and job.negative_prompts() == ["blurry"] * 2


def test_defaults_leave_existing_jobs_unchanged() -> None:
    job = validate_job({**BASE, "seed": 5, "num_images_per_prompt": 2})
    assert job.seeds() == [5, 6] and job.prompts() == ["a cat", "a cat"] and job.negative_prompts() is None
    assert (job.scheduler, job.eta, job.clip_skip, job.timesteps) == (None, None, None, None)
    assert job.steps_to_run == 40


@pytest.mark.parametrize("name", list(SchedulerName))
def test_submit_time_capabilities_match_diffusers(name: SchedulerName, tiny_model: object) -> None:
    from diffusers import PNDMScheduler

    scheduler = build_scheduler(name, PNDMScheduler.from_pretrained(f"{tiny_model}/scheduler").config)
    assert accepts_eta(scheduler) is (name in ACCEPTS_ETA)
    assert accepts_timesteps(scheduler) is (name in ACCEPTS_TIMESTEPS)
    assert accepts_sigmas(scheduler) is (name in ACCEPTS_SIGMAS)


def test_the_switch_builds_each_scheduler_once_and_restores_the_default(tiny_model: object) -> None:
    from diffusers import PNDMScheduler

    class Pipe:
        scheduler: object = None

    pipe, default = Pipe(), PNDMScheduler.from_pretrained(f"{tiny_model}/scheduler")
    switch = SchedulerSwitch(default)
    karras = switch.use(pipe, SchedulerName.DPMPP_2M_KARRAS)
    assert pipe.scheduler is karras and karras.config.use_karras_sigmas and karras.config.algorithm_type == "dpmsolver++"
    assert switch.use(pipe, SchedulerName.DPMPP_2M_KARRAS) is karras
    assert switch.use(pipe, None) is default and pipe.scheduler is default
