"""Cancellation on real services: a queued job never runs; a running one stops at its next step."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from darkroom.common.errors import JobCancelled
from darkroom.common.events import EventType, JobEvent
from darkroom.common.settings import Settings
from darkroom.common.status import JobStatus
from darkroom.common.storage import S3Uri
from darkroom.dev.demo import sample_image
from darkroom.dev.process import WorkerProcess
from darkroom.producer.client import Client

from ..conftest import png_bytes
from .conftest import start_worker

pytestmark = pytest.mark.integration


def upload(client: Client) -> str:
    return client.upload(png_bytes(sample_image(64)), f"s3://darkroom/inputs/{uuid.uuid4().hex}.png")


def outputs_under(client: Client, prefix: str, job_id: str) -> list[str]:
    root = S3Uri.parse(prefix, allow_empty_key=True).join(job_id)
    listing = client.store.client.list_objects_v2(Bucket=root.bucket, Prefix=root.key + "/")
    return [o["Key"] for o in listing.get("Contents", [])]


def test_a_running_job_stops_at_the_next_step_and_publishes_nothing(client: Client, worker: WorkerProcess) -> None:
    uri = upload(client)
    prefix = f"s3://darkroom/cancel-tests/{uuid.uuid4().hex}"
    handle = client.submit({"model": "tiny", "image": uri, "prompt": "long", "strength": 1.0,
                            "num_inference_steps": 400, "seed": 1, "output_prefix": prefix})
    progressed = threading.Event()

    def on_event(event: JobEvent) -> None:
        if event.type is EventType.PROGRESS:
            progressed.set()

    waiter_result: dict[str, Any] = {}

    def wait() -> None:
        try:
            handle.wait(timeout=120, on_event=on_event)
        except JobCancelled as exc:
            waiter_result["cancelled"] = exc

    waiter = threading.Thread(target=wait)
    waiter.start()
    assert progressed.wait(60), "the job never reported progress"
    record = handle.cancel()
    cancelled_at = time.monotonic()
    waiter.join(30)
    assert record.status is JobStatus.CANCELLED and "cancelled" in waiter_result
    # the worker is free again soon (next step), and serves the next job
    nxt = client.submit({"model": "tiny", "image": uri, "prompt": "next", "strength": 0.5,
                         "num_inference_steps": 4, "seed": 2}).wait(timeout=120)
    assert nxt.worker == worker.name
    assert time.monotonic() - cancelled_at < 30
    assert outputs_under(client, prefix, handle.job_id) == []
    assert client.status(handle.job_id).status is JobStatus.CANCELLED


def test_a_queued_job_never_runs(client: Client, services: Any, settings: Settings, tiny_model: Path) -> None:
    uri = upload(client)
    model_id = f"q{uuid.uuid4().hex[:6]}"
    prefix = f"s3://darkroom/cancel-tests/{uuid.uuid4().hex}"
    client.fleet.register_models([model_id])  # its workers are scaled to zero for now
    doomed = client.submit({"model": model_id, "image": uri, "prompt": "x", "strength": 0.5,
                            "num_inference_steps": 4, "seed": 1, "output_prefix": prefix})
    assert client.cancel(doomed.job_id).status is JobStatus.CANCELLED
    kept = client.submit({"model": model_id, "image": uri, "prompt": "y", "strength": 0.5,
                          "num_inference_steps": 4, "seed": 1})
    process = start_worker(services, settings, tiny_model, "--model", f"{model_id}={tiny_model}")
    try:
        assert kept.wait(timeout=120).worker == process.name  # queued after the cancelled one
    finally:
        process.stop()
    with pytest.raises(JobCancelled):
        doomed.wait(timeout=5)
    record = client.status(doomed.job_id)
    assert record.status is JobStatus.CANCELLED and record.attempt == 0 and record.worker is None
    assert outputs_under(client, prefix, doomed.job_id) == []
