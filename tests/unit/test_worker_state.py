"""The worker's runtime state (one lock, touched from many threads) and the report it announces."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from darkroom.common.fleet import CurrentJob, WorkerReport, parse_workers, worker_key
from darkroom.worker.context import WorkerState


def test_jobs_done_counts_every_job_from_many_threads() -> None:
    state = WorkerState()

    def work() -> None:
        for _ in range(2000):
            state.job_done()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert state.jobs_done == 16_000


def test_running_jobs_are_listed_while_inside_only() -> None:
    state = WorkerState()
    with state.running("a"), state.running("b"):
        assert sorted(j.job_id for j in state.current_jobs()) == ["a", "b"]
        assert all(isinstance(j, CurrentJob) and j.since <= time.time() for j in state.current_jobs())
    assert state.current_jobs() == []


def test_engine_busy_and_exit_code() -> None:
    state = WorkerState()
    assert state.engine_busy_since() is None
    state.watch_engine(lambda: 12.5)
    assert state.engine_busy_since() == 12.5
    state.progressed(99.0)
    assert state.progress_at == 99.0
    assert state.exit_code == 0
    state.exit_with(75)
    assert state.exit_code == 75


def test_a_load_beside_the_engine_that_never_ends_is_a_stall_like_a_call_that_never_steps() -> None:
    from types import SimpleNamespace

    from darkroom.worker.context import Heartbeat

    state = WorkerState()
    ctx = SimpleNamespace(state=state, settings=SimpleNamespace(engine_stall_seconds=600.0))
    beat = SimpleNamespace(ctx=ctx)
    since: list[float | None] = [None]
    state.watch_loads(lambda: since[0])
    assert Heartbeat.engine_stalled(beat, now=10_000.0) is None  # type: ignore[arg-type]  # idle, no load
    since[0] = 9_500.0
    assert Heartbeat.engine_stalled(beat, now=10_000.0) is None  # type: ignore[arg-type]  # loading for 500 s
    since[0] = 9_000.0
    state.progressed(9_999.0)  # other models' calls still step: the load alone is stuck
    assert Heartbeat.engine_stalled(beat, now=10_000.0) == 1_000.0  # type: ignore[arg-type]


def test_set_report_returns_the_previous_one() -> None:
    state = WorkerState()
    first = WorkerReport(name="w", resident_models=["a"])
    assert state.set_report(first) is None
    assert state.set_report(WorkerReport(name="w")) == first


def test_reports_are_read_tolerantly() -> None:
    newer = {"schema_version": 2, "name": "ignored", "resident_models": ["m"], "gpu_clock": 1500,
             "cache": {"hits": 3}}
    keys = [worker_key("w1"), worker_key("w2"), worker_key("w3")]
    values = [json.dumps(newer), b"{not json", json.dumps({"resident_models": "not-a-list"})]
    w1, w2, w3 = parse_workers(keys, values)
    # the key names the worker; fields a newer worker adds are kept; missing ones default
    assert (w1.name, w1.report.name, w1.resident_models, w1.report.cache.hits) == ("w1", "w1", ["m"], 3)
    assert w1.data["gpu_clock"] == 1500 and w1.report.cache.misses == 0
    # unreadable reports become empty ones: the worker is listed, routes nothing
    assert (w2.name, w2.resident_models, w3.resident_models) == ("w2", [], [])


def test_liveness_follows_the_heartbeat_loop_not_redis() -> None:
    state = WorkerState()
    before = state.alive_at
    state.still_alive(before + 5)
    assert state.alive_at == before + 5
    assert state.last_heartbeat == 0.0  # no announcement reached Redis: liveness does not depend on it


def test_a_long_recovery_sweep_does_not_hold_up_the_heartbeat() -> None:
    from types import SimpleNamespace

    from darkroom.worker.context import Heartbeat

    # Given a worker whose recovery sweep blocks (a large backlog to look through, a slow Redis)
    release, sweeping = threading.Event(), threading.Event()
    beats: list[float] = []

    def sweep() -> Any:
        sweeping.set()
        release.wait(30)
        return SimpleNamespace(reconciled=[])

    state = WorkerState()
    heartbeat = Heartbeat.__new__(Heartbeat)
    settings = SimpleNamespace(heartbeat_seconds=0.02, engine_stall_seconds=600.0)
    heartbeat.ctx = SimpleNamespace(state=state, settings=settings,  # type: ignore[assignment]
                                    metrics=SimpleNamespace(reconciled=SimpleNamespace(inc=lambda n: None)))
    heartbeat._stop = threading.Event()
    heartbeat.rescue = SimpleNamespace(run_once=sweep)  # type: ignore[assignment]
    heartbeat.beat = lambda: beats.append(time.monotonic())  # type: ignore[method-assign]
    threads = [threading.Thread(target=heartbeat._run, daemon=True),
               threading.Thread(target=heartbeat._rescue, daemon=True)]
    for thread in threads:
        thread.start()
    try:
        # When the sweep has begun and is still running
        assert sweeping.wait(10)
        counted = len(beats)
        deadline = time.monotonic() + 10
        while len(beats) < counted + 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        # Then the worker keeps announcing itself meanwhile
        assert len(beats) >= counted + 5 and not release.is_set()
    finally:
        release.set()
        heartbeat._stop.set()
        state.wake.set()
        for thread in threads:
            thread.join(5)
