"""Issue 3 on real services: model-affinity routing, priorities and LoRA adapters from S3."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from darkroom.common.errors import ErrorCode, JobFailed
from darkroom.common.settings import Settings
from darkroom.dev.demo import sample_image
from darkroom.dev.process import WorkerProcess
from darkroom.dev.tiny import make_tiny_lora, make_tiny_model
from darkroom.producer.client import Client
from darkroom.worker.device import DeviceInfo
from darkroom.worker.pipelines import load_pipeline

from ..conftest import png_bytes
from .conftest import spawn_worker

pytestmark = pytest.mark.integration

PARAMS = {"prompt": "a red boat", "strength": 0.7, "num_inference_steps": 10, "guidance_scale": 7.0, "seed": 3}


@pytest.fixture(scope="module")
def fleet_files(tmp_path_factory: pytest.TempPathFactory, settings: Settings) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fleet")
    a, b = make_tiny_model(root / "a", seed=11), make_tiny_model(root / "b", seed=12)
    lora = make_tiny_lora(a, root / "style.safetensors", seed=5, text_encoder=True)
    registry = root / "registry.toml"
    registry.write_text(
        f'[models.a]\nsource = "{a}"\n'
        f'[models.b]\nsource = "{b}"\nadapters = ["style"]\n'
        f'[adapters.style]\nsource = "{lora}"\n'
    )
    return {"a": a, "b": b, "lora": lora, "registry": registry}


def spawn(services: Any, settings: Settings, name: str, *args: str, **env: str) -> WorkerProcess:
    return spawn_worker(services, settings, f"{name}-{uuid.uuid4().hex[:6]}", *args, **env)


@pytest.fixture(scope="module")
def two_workers(services: Any, settings: Settings, fleet_files: dict[str, Any]) -> Iterator[dict[str, WorkerProcess]]:
    registry = str(fleet_files["registry"])
    w1 = spawn(services, settings, "holds-a", "--models-file", registry, "--preload-model", "a").start()
    w2 = spawn(services, settings, "holds-b", "--models-file", registry, "--preload-model", "b").start()
    try:
        yield {"a": w1, "b": w2}
    finally:
        w1.stop()
        w2.stop()


def upload(client: Client) -> str:
    return client.upload(png_bytes(sample_image(64)), f"s3://darkroom/inputs/{uuid.uuid4().hex}.png")


def fetch(client: Client, uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(client.download(uri))).convert("RGB")).astype(int)


def direct(model_dir: Path) -> np.ndarray:
    pipe = load_pipeline(model_dir, DeviceInfo("cpu", "float32", "cpu"), "float32")
    seed = PARAMS["seed"]
    out = pipe(image=sample_image(64), generator=torch.Generator("cpu").manual_seed(seed),
               **{k: v for k, v in PARAMS.items() if k != "seed"})
    return np.asarray(out.images[0]).astype(int)


def test_a_job_runs_on_the_worker_that_holds_its_model(client: Client, two_workers: dict[str, WorkerProcess]) -> None:
    uri = upload(client)
    handles = [(m, client.submit({"model": m, "image": uri, **PARAMS})) for m in ["a", "b"] * 3]
    for model, handle in handles:
        assert handle.wait(timeout=120).worker == two_workers[model].name
    assert client.fleet.queue_for("a").endswith(".hot.a")


def test_lora_from_s3_then_the_base_model_again(
    client: Client, two_workers: dict[str, WorkerProcess], fleet_files: dict[str, Any]
) -> None:
    uri = upload(client)
    lora_uri = client.upload(fleet_files["lora"], f"s3://darkroom/loras/{uuid.uuid4().hex}.safetensors")
    with_lora = client.submit({"model": "a", "image": uri, **PARAMS, "adapters": [{"uri": lora_uri, "weight": 0.9}]})
    result = with_lora.wait(timeout=120)
    resolved = result.parameters["adapters_resolved"]
    assert resolved[0]["weight"] == 0.9 and len(resolved[0]["sha256"]) == 64
    base = direct(fleet_files["a"])
    assert not np.array_equal(fetch(client, result.uris[0]), base)
    after = client.submit({"model": "a", "image": uri, **PARAMS}).wait(timeout=120)
    assert after.worker == result.worker
    assert np.array_equal(fetch(client, after.uris[0]), base), "the LoRA leaked into the next job"


def test_registry_adapters_and_allowlists(client: Client, two_workers: dict[str, WorkerProcess]) -> None:
    uri = upload(client)
    ok = client.submit({"model": "b", "image": uri, **PARAMS, "adapters": [{"uri": "style", "weight": 0.5}]})
    assert ok.wait(timeout=120).parameters["adapters_resolved"][0]["weight"] == 0.5
    cases = [
        ({"model": "b", "adapters": [{"uri": "s3://darkroom/loras/x.safetensors"}]}, ErrorCode.ADAPTER_NOT_ALLOWED),
        ({"model": "a", "adapters": [{"uri": "no-such-adapter"}]}, ErrorCode.ADAPTER_NOT_FOUND),
        ({"model": "a", "adapters": [{"uri": f"s3://darkroom/loras/{uuid.uuid4().hex}.safetensors"}]},
         ErrorCode.ADAPTER_NOT_FOUND),
    ]
    for fields, code in cases:
        with pytest.raises(JobFailed) as failure:
            client.submit({"image": uri, **PARAMS, **fields}).wait(timeout=120)
        assert failure.value.code == code, failure.value.message
    assert all(w.alive() for w in two_workers.values())


def test_interactive_jobs_go_before_bulk_jobs(
    client: Client, services: Any, settings: Settings, fleet_files: dict[str, Any]
) -> None:
    uri = upload(client)
    model_id = f"p{uuid.uuid4().hex[:6]}"
    # Given bulk jobs queued before an interactive one, with no worker for the model up (scaled to zero)
    client.fleet.register_models([model_id])
    bulk = [client.submit({"model": model_id, "image": uri, **PARAMS, "priority": "bulk"}) for _ in range(3)]
    interactive = client.submit({"model": model_id, "image": uri, **PARAMS, "priority": "interactive"})
    # When a worker for the model starts, taking one message at a time (one task slot): the broker's
    # order is what is tested here. With more slots, jobs prepared together share calls and the
    # engine orders them (interactive first: tests/unit/test_batching.py)
    worker = spawn(services, settings, "prio", "--model", f"{model_id}={fleet_files['a']}",
                   DARKROOM_BATCH_MAX_IMAGES="1", DARKROOM_TASK_SLOTS="1").start()
    try:
        first = interactive.wait(timeout=120)
        rest = [h.wait(timeout=120) for h in bulk]
    finally:
        worker.stop()
    # Then the interactive job finished before every bulk job
    assert all(first.finished_at < r.finished_at for r in rest)
