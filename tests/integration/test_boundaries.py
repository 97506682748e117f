"""No way across, through real processes: job-named files are capped before they fill the disk; the
worker (not only the SDK) refuses references under the quarantine or outside the allowed buckets
before it reads anything; callback tokens stay out of result.json and webhook bodies; the dashboard
proxies no quarantined input (real Redis, S3 server, `darkroom worker` and `darkroom dashboard`)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from darkroom.common.errors import ErrorCode, JobFailed
from darkroom.common.jobs import validate_job
from darkroom.common.queues import TASK_IMG2IMG
from darkroom.common.settings import Settings
from darkroom.dev.demo import sample_image
from darkroom.dev.process import WorkerProcess
from darkroom.dev.tiny import make_tiny_lora
from darkroom.producer.client import Client

from ..conftest import png_bytes
from .conftest import spawn_worker
from .test_dashboard import ADMIN, VIEWER, DashboardProcess, _http, dashboard  # noqa: F401 - a fixture
from .test_failures import celery_sender

pytestmark = pytest.mark.integration

JOB = {"prompt": "a boat", "strength": 0.5, "num_inference_steps": 4, "seed": 1}


@pytest.fixture(scope="module")
def bounded(services: Any, settings: Settings, tiny_model: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A worker with its own cache folder, a download cap just above a real LoRA and an allowlist."""
    root = tmp_path_factory.mktemp("bounded")
    lora = make_tiny_lora(tiny_model, root / "style.safetensors", seed=5)
    cap = lora.stat().st_size + 1024
    model = f"b{uuid.uuid4().hex[:6]}"
    worker = spawn_worker(services, settings, f"bounded-{model}", "--model", f"{model}={tiny_model}",
                          state_dir=root / "state", DARKROOM_MAX_ADAPTER_BYTES=str(cap),
                          DARKROOM_FILE_CACHE_BYTES=str(10 * cap), DARKROOM_ALLOWED_BUCKETS='["darkroom"]',
                          DARKROOM_CPU_THREADS="1")
    worker.start(timeout=120)
    try:
        yield {"worker": worker, "model": model, "lora": lora, "cap": cap, "cache": root / "state" / "cache"}
    finally:
        worker.stop()


def image(client: Client) -> str:
    return client.upload(png_bytes(sample_image(64)), f"s3://darkroom/boundaries/{uuid.uuid4().hex}.png")


def test_an_adapter_over_the_cap_fails_its_job_and_nothing_of_it_is_kept(client: Client,
                                                                        bounded: dict[str, Any]) -> None:
    lora_bytes = bounded["lora"].read_bytes()
    big = client.upload(lora_bytes + b"\0" * (2 * bounded["cap"]), f"s3://darkroom/loras/{uuid.uuid4().hex}.safetensors")
    with pytest.raises(JobFailed) as failure:
        client.submit({"model": bounded["model"], "image": image(client), **JOB,
                       "adapters": [{"uri": big}]}).wait(timeout=120)
    assert failure.value.code == ErrorCode.ADAPTER_INVALID, failure.value.message
    assert f"limit of {bounded['cap']} bytes" in failure.value.message
    blobs = bounded["cache"] / "blobs"
    assert all(b.stat().st_size <= bounded["cap"] for b in blobs.iterdir())

    small = client.upload(lora_bytes, f"s3://darkroom/loras/{uuid.uuid4().hex}.safetensors")
    result = client.submit({"model": bounded["model"], "image": image(client), **JOB,
                            "adapters": [{"uri": small}]}).wait(timeout=120)
    assert result.worker == bounded["worker"].name
    assert sorted(b.stat().st_size for b in blobs.iterdir()) == [len(lora_bytes)]


def send_past_the_sdk(client: Client, model: str, **fields: Any) -> str:
    """A record and a broker message written directly (another producer's SDK, or none): no submit-time policy."""
    job = validate_job({"model": model, "image": image(client), "job_id": uuid.uuid4().hex,
                        "output_prefix": "s3://darkroom/outputs", **JOB, **fields})
    client.jobs.create(job)
    celery_sender(client).send_task(TASK_IMG2IMG, args=[job.model_dump(mode="json")], task_id=job.job_id,
                                    queue=client.fleet.queue_for(model))
    assert job.job_id is not None
    return job.job_id


@pytest.mark.parametrize(("fields", "code", "says"), [
    ({"textual_inversions": [{"uri": "s3://darkroom/quarantine/victim/e.safetensors", "token": "<v>"}]},
     ErrorCode.INVALID_JOB, "quarantine prefix s3://darkroom/quarantine"),
    ({"output_prefix": "s3://darkroom", "job_id": "quarantine"}, ErrorCode.INVALID_JOB, "quarantine prefix"),
    ({"prompt": None, "prompt_embeds": "s3://elsewhere/e.safetensors"}, ErrorCode.BUCKET_NOT_ALLOWED, "'elsewhere'"),
    ({"adapters": [{"uri": "s3://elsewhere/l.safetensors"}]}, ErrorCode.BUCKET_NOT_ALLOWED, "'elsewhere'"),
])
def test_the_worker_refuses_what_the_sdk_would_have(client: Client, bounded: dict[str, Any],
                                                    fields: dict[str, Any], code: ErrorCode, says: str) -> None:
    worker: WorkerProcess = bounded["worker"]
    job_id = send_past_the_sdk(client, bounded["model"], **fields)
    with pytest.raises(JobFailed) as failure:
        client.wait(job_id, timeout=120)
    assert failure.value.code == code, failure.value.message
    assert says in failure.value.message
    assert worker.alive()



def test_the_worker_refuses_a_key_object_stores_read_differently(client: Client, bounded: dict[str, Any]) -> None:
    """s3://darkroom//quarantine/... reads the quarantine on SeaweedFS: the worker's parser refuses it."""
    victim = client.upload(png_bytes(sample_image(64)), f"s3://darkroom/quarantine/{uuid.uuid4().hex}/000.png")
    job = validate_job({"model": bounded["model"], "image": image(client), "job_id": uuid.uuid4().hex,
                        "output_prefix": "s3://darkroom/outputs", **JOB})
    # a message written past the SDK (no record: the worker reads the message itself)
    payload = {**job.model_dump(mode="json"), "image": victim.replace("s3://darkroom/", "s3://darkroom//")}
    celery_sender(client).send_task(TASK_IMG2IMG, args=[payload], task_id=job.job_id,
                                    queue=client.fleet.queue_for(bounded["model"]))
    deadline = time.monotonic() + 120
    while client.jobs.get(job.job_id or "") is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(JobFailed) as failure:
        client.wait(job.job_id or "", timeout=120)
    assert failure.value.code == ErrorCode.INVALID_JOB
    assert "image" in failure.value.message and "starts with '/'" in failure.value.message
    assert bounded["worker"].alive()

def test_a_callback_token_is_kept_out_of_result_json_and_webhook_bodies(settings: Settings,
                                                                        bounded: dict[str, Any]) -> None:
    import redis

    from darkroom.common.webhooks import OUTBOX_KEY, OutboxEntry, webhook_body

    url = "http://127.0.0.1:9/in?token=s3cr3t#sig"  # userinfo is refused at submit already
    with Client(settings.model_copy(update={"allow_private_callbacks": True})) as client:
        handle = client.submit({"model": bounded["model"], "image": image(client), **JOB, "callback_url": url})
        result = handle.wait(timeout=120)
        stored = client.download(result.result_uri).decode()
    assert "s3cr3t" not in stored and "sig" not in json.loads(stored)["parameters"]["callback_url"]
    assert result.parameters["callback_url"] == "http://127.0.0.1:9/in?redacted#redacted"
    queued = redis.Redis.from_url(settings.redis_url.get_secret_value()).lrange(OUTBOX_KEY, 0, -1)
    entries = [e for e in map(OutboxEntry.model_validate_json, queued) if e.job_id == handle.job_id]
    assert entries and all(e.url == url for e in entries)  # the dispatcher still gets the whole URL
    assert all(b"s3cr3t" not in webhook_body(e) for e in entries)


def test_the_dashboard_proxies_no_quarantined_input_and_shows_no_callback_token(
    client: Client, dashboard: DashboardProcess,  # noqa: F811 - the fixture imported above
) -> None:
    victim = client.upload(png_bytes(sample_image(64)), f"s3://darkroom/quarantine/{uuid.uuid4().hex}/000.png")
    good = image(client)
    ids = {}
    for name, uri in (("victim", victim), ("good", good)):
        job = validate_job({"model": "tiny", "image": uri, "job_id": uuid.uuid4().hex, **JOB,
                            "output_prefix": "s3://darkroom/outputs",
                            "callback_url": "https://hooks.example.com/in?token=s3cr3t"})
        client.jobs.create(job)  # a record only, as a job sent past the SDK would leave
        ids[name] = job.job_id
    for token in (ADMIN, VIEWER):
        headers = {"Authorization": f"Bearer {token}"}
        assert _http(f"{dashboard.url}/media/{ids['victim']}/input", headers=headers)[0] == 404
        status, body, _ = _http(f"{dashboard.url}/media/{ids['good']}/input", headers=headers)
        assert status == 200 and body == client.download(good)
        status, page, _ = _http(f"{dashboard.url}/jobs/{ids['good']}", headers=headers)
        assert status == 200 and b"s3cr3t" not in page and b"https://hooks.example.com/in?redacted" in page
        status, page, _ = _http(f"{dashboard.url}/jobs/{ids['victim']}", headers=headers)
        assert status == 200 and b"input not shown" in page and f"/media/{ids['victim']}/input".encode() not in page
