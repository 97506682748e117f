"""Every scheduler and per-job parameter through the real worker is pixel-identical to a direct diffusers call."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from darkroom.common.schedulers import SCHEDULER_CLASSES, SchedulerName
from darkroom.dev.process import WorkerProcess
from darkroom.producer.client import Client
from darkroom.worker.inference.call import clip_skip_compat

from .test_walking_skeleton import fetch_image, upload_input

pytestmark = pytest.mark.integration

PARAMS: dict[str, Any] = {"prompt": "a lighthouse in a storm", "negative_prompt": "blurry", "strength": 0.75,
                          "num_inference_steps": 4, "guidance_scale": 6.0, "seed": 11}


@pytest.fixture(scope="module")
def direct(tiny_model: Path) -> Iterator[Any]:
    """The tiny model loaded straight into diffusers; tests swap its scheduler as diffusers users do."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(str(tiny_model), safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.default_scheduler = pipe.scheduler
    clip_skip_compat(pipe.text_encoder)  # diffusers 0.42's clip_skip path on transformers 5 (see darkroom.worker.inference.call)
    yield pipe


def use_scheduler(pipe: Any, name: str | None) -> None:
    import diffusers

    pipe.scheduler = pipe.default_scheduler
    if name is not None:
        class_name, overrides = SCHEDULER_CLASSES[SchedulerName(name)]
        pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.default_scheduler.config, **overrides)


def direct_images(pipe: Any, image: Image.Image, scheduler: str | None = None, **params: Any) -> list[np.ndarray]:
    """diffusers' own output: one generator per image, as the worker does."""
    import torch

    use_scheduler(pipe, scheduler)
    n = int(params.pop("num_images_per_prompt", 1))
    seed = params.pop("seed")
    seeds = seed if isinstance(seed, list) else [seed + i for i in range(n)]
    for key in ("prompt", "negative_prompt"):
        if key in params and not isinstance(params[key], list):
            params[key] = [params[key]] * n
    out = pipe(image=[image] * n, generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
               num_images_per_prompt=1, **params)
    return [np.asarray(im) for im in out.images]


def assert_same(produced: np.ndarray, expected: np.ndarray) -> None:
    assert produced.shape == expected.shape
    assert np.array_equal(produced, expected), f"max diff {np.abs(produced.astype(int) - expected).max()}"


def run_jobs(client: Client, uri: str, jobs: list[dict[str, Any]]) -> list[list[np.ndarray]]:
    handles = client.submit_many([{"model": "tiny", "image": uri, **job} for job in jobs])
    results = [h.wait(timeout=300) for h in handles]
    return [[fetch_image(client, u) for u in result.uris] for result in results]


def test_every_scheduler_matches_diffusers(client: Client, worker: WorkerProcess, direct: Any) -> None:
    # Given one job per scheduler name
    uri, image = upload_input(client)
    names = [name.value for name in SchedulerName]
    # When they run through the worker
    produced = run_jobs(client, uri, [{**PARAMS, "scheduler": name} for name in names])
    # Then each equals diffusers with that scheduler built from the model's config, and schedulers differ
    outputs = {}
    for name, images in zip(names, produced, strict=True):
        assert_same(images[0], direct_images(direct, image, name, **PARAMS)[0])
        outputs[name] = images[0].tobytes()
    assert len(set(outputs.values())) >= len(names) - 1, "schedulers should not all give the same image"


@pytest.mark.parametrize(
    ("extra", "changed"),
    [
        ({"scheduler": "ddim", "eta": 0.8}, {"eta": 0.0}),
        ({"clip_skip": 1}, {"clip_skip": None}),
        ({"scheduler": "euler", "timesteps": [950, 700, 400, 150]}, {"timesteps": [950, 600, 400, 150]}),
        ({"scheduler": "dpmpp_2m", "timesteps": [900, 650, 300, 100]}, {"timesteps": [900, 650, 350, 100]}),
        ({"scheduler": "euler", "sigmas": [14.0, 7.0, 3.0, 1.0]}, {"sigmas": [14.0, 6.0, 3.0, 1.0]}),
        ({"num_images_per_prompt": 2, "seed": [5, 99], "prompt": ["a red boat", "a green tree"],
          "negative_prompt": ["fog", "rain"]}, {"seed": [5, 100]}),
    ],
    ids=["ddim-eta", "clip-skip", "euler-timesteps", "dpmpp_2m-timesteps", "euler-sigmas",
         "per-image-lists"],
)
def test_each_parameter_matches_diffusers(client: Client, worker: WorkerProcess, direct: Any,
                                          extra: dict[str, Any], changed: dict[str, Any]) -> None:
    uri, image = upload_input(client)
    job = {**PARAMS, **extra}
    (produced,) = run_jobs(client, uri, [job])
    expected = direct_images(direct, image, **job)
    assert len(produced) == len(expected) == job.get("num_images_per_prompt", 1)
    for got, want in zip(produced, expected, strict=True):
        assert_same(got, want)
    # ...and the parameter matters: changing it changes the image
    other = direct_images(direct, image, **{k: v for k, v in {**job, **changed}.items() if v is not None})
    assert not all(np.array_equal(a, b) for a, b in zip(produced, other, strict=True))


def test_a_scheduler_choice_does_not_leak_into_the_next_job(client: Client, worker: WorkerProcess,
                                                            direct: Any) -> None:
    uri, image = upload_input(client)
    # Given a job with a scheduler that ran first
    run_jobs(client, uri, [{**PARAMS, "scheduler": "euler_a"}])
    # When the next job names none
    (produced,) = run_jobs(client, uri, [PARAMS])
    # Then it runs the model's default scheduler, exactly as before
    assert_same(produced[0], direct_images(direct, image, **PARAMS)[0])
