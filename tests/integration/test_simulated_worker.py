"""``darkroom worker --simulate PROFILE`` runs the real worker around pipelines that only sleep.

The simulated workers run with torch, diffusers, safetensors and onnxruntime made unimportable (a
``sitecustomize`` on their path), so a fleet of them needs no ML stack.
"""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from darkroom.common.fleet import WorkerReport
from darkroom.common.settings import Settings
from darkroom.dev.demo import sample_image
from darkroom.dev.process import WorkerProcess
from darkroom.producer.client import Client

from ..helpers import png_bytes
from .helpers import simulated_workers, spawn_worker

pytestmark = pytest.mark.integration

BLOCKER = """
import importlib.abc, sys
BLOCKED = ("torch", "diffusers", "safetensors", "onnxruntime", "transformers", "peft")
class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{name} is blocked: a simulated worker must not import it")
        return None
sys.meta_path.insert(0, _Blocker())
"""

PARAMS = {"prompt": "a boat", "strength": 0.5, "num_inference_steps": 8, "guidance_scale": 5.0, "seed": 1}


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory, services: Any, settings: Settings) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("sim")
    (root / "blocker").mkdir()
    (root / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    a, b = f"sa{uuid.uuid4().hex[:6]}", f"sb{uuid.uuid4().hex[:6]}"
    profile = root / "profile.json"
    profile.write_text(json.dumps({
        "name": "test", "memory_budget_bytes": 1000, "adapter_load_seconds": 0.05,
        "default_model": {"bytes": 100, "load_seconds": 0.1},
        "models": {a: {"bytes": 600, "load_seconds": 0.2}, b: {"bytes": 700, "load_seconds": 0.3}},
        "step_seconds": {"64x64": {"1": 0.005, "4": 0.01}},
    }))
    import os

    path = os.pathsep.join([str(root / "blocker"), os.environ.get("PYTHONPATH", "")])
    workers = simulated_workers(services, settings, profile, "sim", [a, b], PYTHONPATH=path)
    try:
        yield {"a": a, "b": b, "workers": workers}
    finally:
        for worker in workers:
            worker.stop()


def test_simulated_workers_run_jobs_load_and_evict_by_bytes(client: Client, sim: dict[str, Any]) -> None:
    a, b = sim["a"], sim["b"]
    workers: list[WorkerProcess] = sim["workers"]
    uri = client.upload(png_bytes(sample_image(64)), f"s3://darkroom/inputs/{uuid.uuid4().hex}.png")
    lora = f"s3://darkroom/loras/{uuid.uuid4().hex}.safetensors"  # never fetched: its URI is its identity
    # Given each simulated worker holding one model (a: 600 of 1000 bytes, b: 700)
    first = [client.submit({"model": m, "image": uri, **PARAMS}) for m in (a, b, a, b)]
    results = [h.wait(timeout=60) for h in first]
    # Then each job ran on the worker that holds its model (hot queues), with real outputs
    assert [r.worker for r in results] == [workers[0].name, workers[1].name] * 2
    out = Image.open(io.BytesIO(client.download(results[0].uris[0])))
    assert out.size == (64, 64)
    assert results[0].parameters.get("simulated") == "test"
    # When the b-worker is stopped and a job for b arrives with a LoRA, the a-worker takes it from b's cold
    # queue: loading b (700) does not fit beside a (600) in 1000 bytes, so a is evicted
    workers[1].stop()
    moved = client.submit({"model": b, "image": uri, **PARAMS, "adapters": [{"uri": lora, "weight": 0.8}]})
    result = moved.wait(timeout=60)
    assert result.worker == workers[0].name
    assert result.parameters["adapters_resolved"][0]["weight"] == 0.8
    assert result.timings.model_load > 0
    # Then the report shows the load, the eviction by bytes and the adapter slot
    report = _report(client, workers[0].name, lambda r: r.jobs_done == 3 and r.resident_models == [b])
    assert report.resident_models == [b]
    assert report.resident_bytes == 700 and report.memory_budget == 1000
    assert report.cache.evictions == 1 and report.cache.misses == 2  # a at start-up, then b
    assert len(report.resident_adapters[b]) == 1
    assert report.jobs_done == 3
    # and b's times, which idle workers weigh before loading it to help (load 0.3 s; 4 steps of 0.005 s)
    times = report.model_times[b]
    assert times.load_seconds >= 0.3 and times.image_seconds is not None and 0.02 <= times.image_seconds < 5
    assert report.device == "sim"
    assert "ModuleNotFoundError" not in workers[0].tail(400)


def _report(client: Client, name: str, ready: Callable[[WorkerReport], bool], timeout: float = 30) -> WorkerReport:
    """The worker's announced report once ``ready`` holds (it is announced from its heartbeat thread)."""
    deadline = time.monotonic() + timeout
    while True:
        report = next((w.report for w in client.fleet.workers(fresh=True) if w.name == name), None)
        if report is not None and (ready(report) or time.monotonic() > deadline):
            return report
        time.sleep(0.2)


def test_a_profile_is_checked_at_start(tmp_path: Path, services: Any, settings: Settings) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"step_seconds": {"big": {"1": 0.1}}, "models": {"x": {}}}))
    worker = spawn_worker(services, settings, f"badsim-{uuid.uuid4().hex[:6]}", "--simulate", str(bad))
    with pytest.raises(RuntimeError, match="WIDTHxHEIGHT"):
        worker.start(timeout=30)


def test_a_worker_serves_the_model_it_holds_while_another_loads_beside_its_engine(
        tmp_path: Path, services: Any, settings: Settings, client: Client) -> None:
    import os

    (tmp_path / "blocker").mkdir()
    (tmp_path / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    a, b = f"la{uuid.uuid4().hex[:6]}", f"lb{uuid.uuid4().hex[:6]}"
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({
        "name": "beside", "memory_budget_bytes": 2000,
        "models": {a: {"bytes": 600, "load_seconds": 0.1}, b: {"bytes": 700, "load_seconds": 4.0}},
        "step_seconds": {"64x64": {"1": 0.005}},
    }))
    path = os.pathsep.join([str(tmp_path / "blocker"), os.environ.get("PYTHONPATH", "")])
    # Given a worker holding a, and a job for b, which takes seconds to load
    [worker] = simulated_workers(services, settings, profile, "beside", [a], PYTHONPATH=path)
    try:
        uri = client.upload(png_bytes(sample_image(64)), f"s3://darkroom/inputs/{uuid.uuid4().hex}.png")
        cold = client.submit({"model": b, "image": uri, **PARAMS})
        deadline = time.monotonic() + 30
        while client.status(cold.job_id).status.value == "queued":
            assert time.monotonic() < deadline, "b's job was never taken"
            time.sleep(0.05)
        # (the worker announces the load at once: idle workers count it as a coming holder of b)
        during = _report(client, worker.name, lambda r: r.loading_model == b, timeout=3)
        assert during.loading_model == b and during.resident_models == [a]
        # When a job for a arrives while b loads
        hot = client.submit({"model": a, "image": uri, **PARAMS})
        first, second = hot.wait(timeout=60), cold.wait(timeout=60)
        # Then a's job ran during b's load (on the engine thread it would have waited for the load and b's call)
        assert first.worker == second.worker == worker.name
        assert first.finished_at < second.finished_at
        assert first.timings.model_load == 0 and second.timings.model_load >= 4.0
        # And both models stay resident within the budget: one load, no eviction
        report = _report(client, worker.name, lambda r: r.jobs_done == 2 and len(r.resident_models) == 2)
        assert sorted(report.resident_models) == sorted([a, b]) and report.cache.evictions == 0
        assert report.loading_model is None
        assert report.cache.misses == 2 and report.cache.hits == 1  # a at start-up, b beside; a's job a hit
    finally:
        worker.stop()
