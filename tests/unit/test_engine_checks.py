"""Per-job checks the engine makes against the model's real scheduler before a call."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from darkroom.common.errors import JobError
from darkroom.common.jobs import Img2ImgJob
from darkroom.worker.inference.call import check_call_options


def job(steps: int) -> Img2ImgJob:
    return Img2ImgJob(model="tiny", image="s3://inputs/x.png", prompt="p", num_inference_steps=steps, strength=1.0)


def test_more_steps_than_the_noise_schedule_has_is_a_job_error_not_a_crash() -> None:
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler(num_train_timesteps=1000, steps_offset=1, skip_prk_steps=True)
    pipeline = SimpleNamespace(scheduler=scheduler, text_encoder=None)
    check_call_options(job(999), pipeline)  # the last step lands on timestep 999
    with pytest.raises(JobError) as refused:
        check_call_options(job(1000), pipeline)  # diffusers would index timestep 1000
    assert refused.value.code == "invalid_job"
    assert "1 <= num_inference_steps <= 999" in refused.value.message
