"""Bad input never hurts the fleet: each case ends the job `failed` with a stable code and a message
saying what to do, and the same worker serves the next job (real Redis, S3 server and worker)."""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from darkroom.common.errors import ErrorCode, InvalidJobError, JobFailed
from darkroom.common.jobs import validate_job
from darkroom.common.queues import TASK_IMG2IMG
from darkroom.common.settings import Settings
from darkroom.dev.demo import sample_image
from darkroom.dev.process import WorkerProcess
from darkroom.producer.client import Client

from ..conftest import png_bytes
from .conftest import spawn_worker
from .test_failures import celery_sender

pytestmark = pytest.mark.integration

LIMITS = {"DARKROOM_MAX_IMAGE_BYTES": "200000", "DARKROOM_MAX_IMAGE_PIXELS": str(300 * 300),
          "DARKROOM_ALLOWED_BUCKETS": '["darkroom"]', "DARKROOM_CPU_THREADS": "1"}
JOB = {"prompt": "a boat", "strength": 0.5, "num_inference_steps": 4, "seed": 1}


@pytest.fixture(scope="module")
def hardened(services: Any, settings: Settings, tiny_model: Path) -> Iterator[tuple[WorkerProcess, str]]:
    model = f"h{uuid.uuid4().hex[:6]}"
    worker = spawn_worker(services, settings, f"hardened-{model}", "--model", f"{model}={tiny_model}", **LIMITS)
    worker.start()
    try:
        yield worker, model
    finally:
        worker.stop()


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def put(client: Client, data: bytes, bucket: str = "darkroom") -> str:
    return client.upload(data, f"s3://{bucket}/hardening/{uuid.uuid4().hex}.png")


def other_bucket(client: Client) -> str:
    client.store.ensure_bucket("elsewhere")
    return put(client, png_bytes(sample_image(64)), "elsewhere")


CASES: dict[str, tuple[Callable[[Client], str], ErrorCode, str]] = {
    "oversized object": (lambda c: put(c, Image.effect_noise((400, 400), 80).convert("RGB").tobytes()[:250_000]
                                       + b"\0" * 10), ErrorCode.INPUT_TOO_LARGE, "limit is 200000 bytes"),
    "too many pixels": (lambda c: put(c, encoded(Image.new("RGB", (400, 400)))), ErrorCode.INPUT_TOO_LARGE,
                        "Resize it"),
    "decompression bomb": (lambda c: put(c, encoded(Image.new("1", (12_000, 12_000)))), ErrorCode.INPUT_TOO_LARGE,
                           "pixels"),
    "truncated png": (lambda c: put(c, png_bytes(sample_image(64))[:300]), ErrorCode.INPUT_UNREADABLE, "truncated"),
    "not an image": (lambda c: put(c, b"%PDF-1.7 definitely not a picture"), ErrorCode.INPUT_UNREADABLE, "readable"),
    "too small": (lambda c: put(c, encoded(Image.new("RGB", (4, 64)))), ErrorCode.INPUT_UNSUPPORTED, ">= 8"),
    "missing object": (lambda c: f"s3://darkroom/hardening/{uuid.uuid4().hex}.png", ErrorCode.INPUT_NOT_FOUND,
                       "upload it first"),
    "bucket outside the allowlist": (other_bucket, ErrorCode.BUCKET_NOT_ALLOWED, "allowlist"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_with_a_code_and_the_worker_serves_the_next_job(
    client: Client, hardened: tuple[WorkerProcess, str], case: str
) -> None:
    worker, model = hardened
    make_input, code, hint = CASES[case]
    with pytest.raises(JobFailed) as failure:
        client.submit({"model": model, "image": make_input(client), **JOB}).wait(timeout=120)
    assert failure.value.code == code, failure.value.message
    assert hint in failure.value.message
    good = put(client, png_bytes(sample_image(64)))
    assert client.submit({"model": model, "image": good, **JOB}).wait(timeout=120).worker == worker.name


def test_a_foreign_producers_invalid_message_fails_as_invalid_job(
    client: Client, hardened: tuple[WorkerProcess, str]
) -> None:
    worker, model = hardened
    job = validate_job({"model": model, "image": put(client, png_bytes(sample_image(64))), "job_id": uuid.uuid4().hex,
                        "output_prefix": "s3://darkroom/outputs", **JOB})
    payload = {**job.model_dump(mode="json"), "strength": 1.5, "colour": "red"}  # bypasses submit-time checks
    celery_sender(client).send_task(TASK_IMG2IMG, args=[payload], task_id=job.job_id,
                                    queue=client.fleet.queue_for(model))
    deadline = time.monotonic() + 120  # no record yet: the worker makes a failed one from the message
    while client.jobs.get(job.job_id or "") is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(JobFailed) as failure:
        client.wait(job.job_id or "", timeout=120)
    assert failure.value.code == ErrorCode.INVALID_JOB
    assert "strength" in failure.value.message and "colour" in failure.value.message
    assert worker.alive()


def test_an_unknown_model_is_refused_at_submit(client: Client, hardened: tuple[WorkerProcess, str]) -> None:
    _, model = hardened
    with pytest.raises(InvalidJobError) as refused:
        client.submit({"model": "no-such-model", "image": "s3://darkroom/x.png", **JOB})
    assert refused.value.errors[0].field == "model" and model in str(refused.value)
