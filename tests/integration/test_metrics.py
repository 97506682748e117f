"""A running worker's /metrics after jobs: counters and histograms with the right counts; health endpoints."""

from __future__ import annotations

import socket
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from darkroom.common.errors import JobFailed
from darkroom.common.settings import Settings
from darkroom.dev.demo import sample_image
from darkroom.producer.client import Client

from ..conftest import png_bytes
from .conftest import spawn_worker

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_the_jobs_that_ran(client: Client, services: Any, settings: Settings, tiny_model: Path) -> None:
    port, model = free_port(), f"m{uuid.uuid4().hex[:6]}"
    worker = spawn_worker(services, settings, f"metrics-{model}", "--model", f"{model}={tiny_model}",
                          DARKROOM_METRICS_PORT=str(port))
    worker.start()
    try:
        uri = client.upload(png_bytes(sample_image(64)), f"s3://darkroom/inputs/{uuid.uuid4().hex}.png")
        job = {"model": model, "image": uri, "prompt": "x", "strength": 0.5, "num_inference_steps": 4, "seed": 1}
        for _ in range(3):
            client.submit(job).wait(timeout=120)
        with pytest.raises(JobFailed):
            client.submit({**job, "image": "s3://darkroom/inputs/missing.png"}).wait(timeout=120)
        samples = scrape(port)
        deadline = time.monotonic() + 10  # the worker records a job's metrics just after publishing its end
        while samples.get(("darkroom_deliveries_total", (("outcome", "run"),))) != 4 and time.monotonic() < deadline:
            time.sleep(0.1)
            samples = scrape(port)
        assert samples[("darkroom_jobs_total", (("code", ""), ("status", "succeeded")))] == 3
        assert samples[("darkroom_jobs_total", (("code", "input_not_found"), ("status", "failed")))] == 1
        assert samples[("darkroom_job_seconds_count", (("stage", "inference"),))] == 3
        assert samples[("darkroom_job_seconds_count", (("stage", "total"),))] == 3
        assert samples[("darkroom_batch_size_count", ())] == 3
        assert samples[("darkroom_deliveries_total", (("outcome", "run"),))] == 4
        assert samples[("darkroom_model_cache_events_total", (("event", "hit"),))] >= 3
        assert samples[("darkroom_model_resident", (("model", model),))] == 1
        assert samples[("darkroom_resident_bytes", ())] > 1_000_000
        assert samples[("darkroom_jobs_in_progress", ())] == 0
        assert samples[("darkroom_queue_depth", (("queue", f"darkroom.img2img.cold.{model}"),))] == 0
        client.jobs.redis.hincrby("darkroom:webhooks:stats", "delivered", 0)  # the key exists, maybe still 0
        delivered = int(client.jobs.redis.hget("darkroom:webhooks:stats", "delivered") or 0)
        assert scrape(port)[("darkroom_webhook_deliveries_total", (("outcome", "delivered"),))] == delivered
        for path, body in (("/healthz", b"live"), ("/readyz", b"ready")):
            assert urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10).read().startswith(body)
    finally:
        worker.stop()
