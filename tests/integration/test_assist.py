"""Assist with real simulated workers: an idle worker joins the holders of a model whose hot queue is deep."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from darkroom.common.assist import Candidate, claim
from darkroom.common.settings import Settings
from darkroom.dev.demo import sample_image
from darkroom.producer.client import Client

from ..helpers import png_bytes
from .helpers import simulated_workers

pytestmark = pytest.mark.integration

PARAMS = {"prompt": "a boat", "strength": 1.0, "num_inference_steps": 8, "guidance_scale": 5.0,
          "priority": "bulk"}


@pytest.fixture(params=[False, True], ids=["takes-jobs-first", "loads-first"])
def pair(request: Any, tmp_path: Any, services: Any, settings: Settings) -> Iterator[dict[str, Any]]:
    a, b = f"ta{uuid.uuid4().hex[:6]}", f"tb{uuid.uuid4().hex[:6]}"
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({
        "name": "assist", "memory_budget_bytes": 1000, "adapter_load_seconds": 0.0,
        "models": {a: {"bytes": 300, "load_seconds": 0.1}, b: {"bytes": 300, "load_seconds": 0.1}},
        "step_seconds": {"64x64": {"1": 0.02}},
    }))
    # one job at a time per worker, so that a flood stays in the broker; an assist look every 0.2 s
    workers = simulated_workers(services, settings, profile, "to", [a, b], DARKROOM_TASK_SLOTS="2",
                                DARKROOM_BATCH_MAX_IMAGES="1", DARKROOM_ASSIST_QUEUE_DEPTH="4",
                                DARKROOM_ASSIST_INTERVAL_SECONDS="0.2",
                                DARKROOM_ASSIST_LOAD_FIRST=str(request.param).lower())
    try:
        yield {"a": a, "b": b, "workers": workers, "load_first": request.param}
    finally:
        for worker in workers:
            worker.stop()


def _wait_for(client: Client, ready: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not ready({w.name: w.report for w in client.fleet.workers(fresh=True)}):
        assert time.monotonic() < deadline, "the fleet never reached the expected state"
        time.sleep(0.1)


def test_an_idle_worker_assists_with_a_flood_for_a_model_it_did_not_hold(client: Client, pair: dict[str, Any]) -> None:
    a, b = pair["a"], pair["b"]
    holder, idle = (w.name for w in pair["workers"])
    # Given one worker holding a, another holding b, both idle
    _wait_for(client, lambda r: r.get(holder) and r[holder].resident_models == [a]
              and r.get(idle) and r[idle].resident_models == [b])
    uri = client.upload(png_bytes(sample_image(64)), f"s3://darkroom/inputs/{uuid.uuid4().hex}.png")
    # When a flood of bulk jobs for a arrives (all to a's hot queue: a is held)
    assert client.fleet.queue_for(a).endswith(f"hot.{a}")
    handles = client.submit_many([{"model": a, "image": uri, **PARAMS} for _ in range(40)])
    results = [h.wait(timeout=120) for h in handles]
    # Then the worker that held only b helped: it loaded a once and ran part of the flood
    by_worker = Counter(r.worker for r in results)
    assert by_worker[idle] > 0 and by_worker[holder] > 0
    loads = sum(r.parameters["sim"]["model_loads"] for r in results if r.worker == idle)
    assert loads == 1
    waited = [r.timings.model_load or 0.0 for r in results if r.worker == idle]
    if pair["load_first"]:
        # loading a first, beside its engine: it took a's jobs only once a was resident, so none of them waited
        # for the load in its task slots (the flood's jobs stayed in the broker for the holder meanwhile)
        assert all(wait == 0.0 for wait in waited)
    else:  # it took jobs at once: its first ones waited for the load
        assert max(waited) >= 0.1
    # and it now holds both models (a fitted beside b: nothing was evicted), so it reads a's hot queue for good
    _wait_for(client, lambda r: sorted(r[idle].resident_models) == sorted([a, b]) and r[idle].cache.evictions == 0)
    first = " (loading it first)" if pair["load_first"] else ":"
    assert f"assisting with model {a}{first}" in pair["workers"][1].tail(4000)


def test_helper_places_are_bounded_by_the_backlog(client: Client) -> None:
    model = f"tc{uuid.uuid4().hex[:6]}"
    candidate = Candidate(model, backlog=40, holders=1, places=2)
    assert [claim(client.jobs.redis, candidate, ttl_seconds=30) for _ in range(3)] == [True, True, False]
    # a fresh look with a deeper backlog offers more places
    assert claim(client.jobs.redis, Candidate(model, backlog=48, holders=1, places=3), ttl_seconds=30)
