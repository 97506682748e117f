"""The main path on real services: SDK -> Redis -> Celery worker process -> S3 -> SDK."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from darkroom.common.errors import ErrorCode, JobFailed
from darkroom.common.events import EventType, JobEvent
from darkroom.common.status import JobStatus
from darkroom.dev.demo import sample_image
from darkroom.dev.process import WorkerProcess
from darkroom.producer.client import Client

from ..conftest import png_bytes

pytestmark = pytest.mark.integration

PARAMS = {
    "prompt": "a lighthouse in a storm",
    "negative_prompt": "blurry",
    "strength": 0.6,
    "num_inference_steps": 10,
    "guidance_scale": 6.0,
    "seed": 42,
}


@pytest.fixture(scope="module")
def direct_pipeline(tiny_model: Path) -> object:
    """The same tiny model loaded straight into diffusers, in the test process."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(str(tiny_model), safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def direct_call(pipe: object, image: Image.Image, **params: object) -> np.ndarray:
    import torch

    seed = int(params.pop("seed"))  # type: ignore[call-overload]
    out = pipe(image=image, generator=torch.Generator("cpu").manual_seed(seed), **params)  # type: ignore[operator]
    return np.asarray(out.images[0])


def upload_input(client: Client, size: int = 64) -> tuple[str, Image.Image]:
    image = sample_image(size)
    uri = client.upload(png_bytes(image), f"s3://darkroom/inputs/{uuid.uuid4().hex}.png")
    return uri, image


def fetch_image(client: Client, uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(client.download(uri))).convert("RGB"))


def test_job_output_is_pixel_identical_to_a_direct_diffusers_call(
    client: Client, worker: WorkerProcess, direct_pipeline: object
) -> None:
    # Given an input in S3 and a job with every skeleton parameter set
    uri, image = upload_input(client)
    # When it runs through Redis, the worker process and S3
    result = client.submit({"model": "tiny", "image": uri, **PARAMS}).wait(timeout=120)
    # Then the stored PNG equals diffusers' own output for the same model, parameters and seed
    produced = fetch_image(client, result.uris[0])
    expected = direct_call(direct_pipeline, image, **PARAMS)
    assert produced.shape == expected.shape == (64, 64, 3)
    assert np.array_equal(produced, expected), f"max diff {np.abs(produced.astype(int) - expected).max()}"
    # ...and the comparison is sensitive: one changed parameter gives another image
    changed = direct_call(direct_pipeline, image, **{**PARAMS, "strength": 0.7})
    assert not np.array_equal(produced, changed)
    changed_seed = direct_call(direct_pipeline, image, **{**PARAMS, "seed": 43})
    assert not np.array_equal(produced, changed_seed)


def test_result_json_and_status_echo_parameters_seeds_and_timings(client: Client, worker: WorkerProcess) -> None:
    uri, _ = upload_input(client)
    handle = client.submit({"model": "tiny", "image": uri, **PARAMS})
    result = handle.wait(timeout=120)
    record = json.loads(client.download(result.result_uri))
    assert record["job_id"] == handle.job_id
    assert record["outputs"][0]["uri"] == result.uris[0]
    assert record["outputs"][0]["seed"] == 42
    safety = record["outputs"][0]["safety"]  # the worker's default checker scored it (see test_safety_policies.py)
    assert safety["checker"] == "opennsfw" and 0.0 <= safety["score"] <= 1.0
    assert record["outputs"][0]["nsfw"] is safety["flagged"] is (safety["score"] >= 0.5)
    # int(10 * 0.6) = 6 steps requested; the tiny model's PNDM scheduler runs one extra (PLMS warm-up)
    assert record["parameters"]["strength"] == 0.6 and record["parameters"]["steps_run"] == 7
    assert record["worker"] == worker.name
    assert record["timings"]["inference"] > 0 and record["timings"]["total"] >= record["timings"]["inference"]
    status = client.status(handle.job_id)
    assert status.status is JobStatus.SUCCEEDED and status.attempt == 1
    assert status.result is not None and status.result.uris == result.uris


def test_several_images_per_prompt_use_consecutive_seeds(
    client: Client, worker: WorkerProcess, direct_pipeline: object
) -> None:
    uri, image = upload_input(client)
    result = client.submit({"model": "tiny", "image": uri, **PARAMS, "num_images_per_prompt": 2}).wait(timeout=120)
    assert result.seeds == [42, 43]
    assert len(result.uris) == 2 and result.uris[0] != result.uris[1]
    for output in result.outputs:
        # a batch of two matches each single call within one uint8 step
        expected = direct_call(direct_pipeline, image, **{**PARAMS, "seed": output.seed})
        diff = np.abs(fetch_image(client, output.uri).astype(int) - expected.astype(int)).max()
        assert diff <= 1


def test_wait_sees_lifecycle_events(client: Client, worker: WorkerProcess) -> None:
    uri, _ = upload_input(client)
    events: list[JobEvent] = []
    result = client.submit({"model": "tiny", "image": uri, **PARAMS}).wait(timeout=120, on_event=events.append)
    types = [e.type for e in events]
    assert types[-1] is EventType.SUCCEEDED
    progress = [e for e in events if e.type is EventType.PROGRESS]
    assert progress and progress[-1].step == progress[-1].total_steps == result.parameters["steps_run"]


def test_missing_input_fails_with_a_code_and_the_worker_serves_the_next_job(
    client: Client, worker: WorkerProcess
) -> None:
    # Given a job whose input object does not exist
    missing = client.submit({"model": "tiny", "image": f"s3://darkroom/missing/{uuid.uuid4().hex}.png", **PARAMS})
    # Then it ends failed with a machine-readable code
    with pytest.raises(JobFailed) as failure:
        missing.wait(timeout=120)
    assert failure.value.code == ErrorCode.INPUT_NOT_FOUND
    assert "does not exist" in failure.value.message
    assert client.status(missing.job_id).status is JobStatus.FAILED
    # And the same worker process serves the next job
    uri, _ = upload_input(client)
    result = client.submit({"model": "tiny", "image": uri, **PARAMS}).wait(timeout=120)
    assert result.worker == worker.name and worker.alive()


def test_corrupt_input_fails_as_unreadable(client: Client, worker: WorkerProcess) -> None:
    uri = client.upload(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, f"s3://darkroom/inputs/{uuid.uuid4().hex}.png")
    with pytest.raises(JobFailed) as failure:
        client.submit({"model": "tiny", "image": uri, **PARAMS}).wait(timeout=120)
    assert failure.value.code == ErrorCode.INPUT_UNREADABLE
    assert worker.alive()
