"""Cross-request batching through a real worker: same outputs as alone, bounded waits, durable success."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from darkroom.common.settings import Settings
from darkroom.dev.process import WorkerProcess
from darkroom.producer import Client, JobFailed

from ..conftest import png_bytes
from .conftest import plain_pipeline, spawn_worker
from .test_walking_skeleton import fetch_image

pytestmark = pytest.mark.integration

MAX_WAIT_S = 3.0
MODEL = "tiny-batching"  # served by this module's worker only: the session's worker must not take its jobs
COMMON: dict[str, Any] = {"model": MODEL, "strength": 0.75, "num_inference_steps": 4, "guidance_scale": 6.0}


@pytest.fixture(scope="module")
def batching_worker(services: object, settings: Settings, tiny_model: Path) -> Iterator[WorkerProcess]:
    """A worker that batches up to 4 images and waits up to 3 s for a batch to fill."""
    process = spawn_worker(services, settings, f"batch-{uuid.uuid4().hex[:6]}", "--model", f"{MODEL}={tiny_model}",
                           DARKROOM_BATCH_MAX_IMAGES="4", DARKROOM_BATCH_MAX_WAIT_MS=str(int(MAX_WAIT_S * 1000)),
                           DARKROOM_SAFETY_CHECKER="none", DARKROOM_FAULT_INJECTION="true").start(timeout=120)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def direct(tiny_model: Path) -> Any:
    return plain_pipeline(tiny_model)


def distinct_inputs(client: Client, count: int) -> list[tuple[str, Image.Image]]:
    rng = np.random.default_rng(7)
    out = []
    for _ in range(count):
        image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        out.append((client.upload(png_bytes(image), f"s3://darkroom/inputs/{uuid.uuid4().hex}.png"), image))
    return out


def alone(pipe: Any, image: Image.Image, prompt: str, seed: int, **params: Any) -> np.ndarray:
    import torch

    out = pipe(prompt=[prompt], image=[image], generator=[torch.Generator("cpu").manual_seed(seed)],
               num_images_per_prompt=1, **params)
    return np.asarray(out.images[0])


def test_batched_jobs_match_their_single_job_outputs(client: Client, batching_worker: WorkerProcess,
                                                     direct: Any) -> None:
    # Given four compatible jobs with different images, prompts, seeds and strengths that run the same steps
    inputs = distinct_inputs(client, 4)
    jobs = [{**COMMON, "image": uri, "prompt": f"variant {i}", "seed": 100 + i,
             "strength": 0.75 if i % 2 else 0.8} for i, (uri, _) in enumerate(inputs)]
    # When they are submitted together
    results = [h.wait(timeout=300) for h in client.submit_many(jobs)]
    # Then they shared one pipeline call
    assert {r.parameters["batch"]["jobs"] for r in results} == {4}
    # And each output equals what diffusers makes for that job alone, within one uint8 step
    for job, (_, image), result in zip(jobs, inputs, results, strict=True):
        expected = alone(direct, image, job["prompt"], job["seed"], strength=job["strength"],
                         num_inference_steps=4, guidance_scale=6.0)
        produced = fetch_image(client, result.uris[0])
        assert produced.shape == expected.shape
        assert np.abs(produced.astype(int) - expected.astype(int)).max() <= 1
    # And the outputs differ from each other (each job got its own image, prompt and seed)
    assert len({fetch_image(client, r.uris[0]).tobytes() for r in results}) == 4


def test_an_incompatible_job_waits_at_most_the_maximum_wait_plus_the_call_before(
    client: Client, batching_worker: WorkerProcess
) -> None:
    # Given two compatible jobs and one that cannot join them (other step count)
    (uri, _), = distinct_inputs(client, 1)
    handles = client.submit_many([{**COMMON, "image": uri, "prompt": "a", "seed": 1},
                                  {**COMMON, "image": uri, "prompt": "b", "seed": 2},
                                  {**COMMON, "image": uri, "prompt": "c", "seed": 3, "num_inference_steps": 6}])
    first, second, odd = (h.wait(timeout=300) for h in handles)
    # Then the compatible ones shared a call and the odd one ran alone
    assert first.parameters["batch"]["jobs"] == 2 and second.parameters["batch"]["jobs"] == 2
    assert odd.parameters["batch"]["jobs"] == 1
    # And the odd one waited no longer than the maximum wait plus the other call (with 1 s for messaging)
    other_call = max(first.timings.inference, first.timings.model_load + first.timings.inference)
    assert odd.timings.batch_wait <= MAX_WAIT_S + other_call + 1.0, odd.timings


def test_a_job_whose_upload_fails_is_not_reported_succeeded(client: Client, batching_worker: WorkerProcess) -> None:
    # Given a batch in which one job's uploads fail (storage refuses them after denoising)
    (uri, _), = distinct_inputs(client, 1)
    handles = client.submit_many([
        {**COMMON, "image": uri, "prompt": "stored", "seed": 1},
        {**COMMON, "image": uri, "prompt": "lost [[fault:upload]]", "seed": 2},
    ])
    stored = handles[0].wait(timeout=300)
    # Then the job whose upload failed ends failed with output_write_failed, never succeeded
    with pytest.raises(JobFailed) as failure:
        handles[1].wait(timeout=300)
    assert failure.value.code == "output_write_failed"
    assert client.status(handles[1].job_id).status.value == "failed"  # terminal: it was never succeeded
    # And its batch-mate succeeded with its image readable
    assert stored.parameters["batch"]["jobs"] == 2
    assert Image.open(io.BytesIO(client.download(stored.uris[0]))).size == (64, 64)
