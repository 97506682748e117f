"""Model loads beside the engine: the real cache (simulated loads), the engine thread and the subscriptions."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image

from darkroom.common.errors import ErrorCode, JobError
from darkroom.common.jobs import Img2ImgJob
from darkroom.common.queues import cold_queue, hot_queue
from darkroom.worker.inference.batching import BatchPolicy
from darkroom.worker.inference.call import WorkItem, batch_key
from darkroom.worker.inference.engine import Engine, Inference, Request
from darkroom.worker.inference.loads import ModelLoads
from darkroom.worker.pipelines import LoadedModel
from darkroom.worker.registry import ModelSpec
from darkroom.worker.routing import QueueSubscriptions
from darkroom.worker.simulate import Profile, SimulatedDevice, SimulatedModels, simulated_registry

from ..helpers import RecordingConsumer

IMAGE = Image.new("RGB", (64, 64))
IDS = itertools.count()
PROFILE: dict[str, Any] = {"step_seconds": {"64x64": {"1": 0.01}}, "time_scale": 0.001,
                           "models": {"a": {"bytes": 600, "load_seconds": 0}, "b": {"bytes": 700, "load_seconds": 0},
                                      "c": {"bytes": 300, "load_seconds": 0},
                                      "huge": {"bytes": 10**6, "load_seconds": 0}}}


class GatedModels(SimulatedModels):
    """The real cache; a load of a model in ``gates`` waits for its event (the test decides when it ends)."""

    def __init__(self, budget: int = 1000) -> None:
        profile = Profile.from_dict(PROFILE)
        super().__init__(simulated_registry(profile), SimulatedDevice("sim", "float16", "sim", budget),
                         files=None, profile=profile, budget_bytes=budget)  # type: ignore[arg-type]
        self.gates: dict[str, threading.Event] = {}
        self.loading: list[str] = []

    def _load(self, spec: ModelSpec) -> LoadedModel:
        self.loading.append(spec.id)
        gate = self.gates.get(spec.id)
        if gate is not None:
            assert gate.wait(10)
        return super()._load(spec)


def request(model: str, *, priority: int = 1) -> Request:
    job = Img2ImgJob(model=model, image="s3://inputs/x.png", prompt="p", strength=1.0, seed=1,
                     num_inference_steps=2, job_id=f"job-{next(IDS)}")
    item = WorkItem(job, IMAGE, job.seeds())
    return Request(item, batch_key(item), priority=priority)


def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


class Calls:
    """An executor that records each call's model and whether a load was running beside it."""

    def __init__(self, models: GatedModels, loads: ModelLoads) -> None:
        self.models, self.loads = models, loads
        self.calls: list[tuple[str, int, bool, bool]] = []  # model, jobs, a load ran beside, paid for a load

    def __call__(self, batch: list[Request]) -> list[Inference | BaseException]:
        model = batch[0].key.model
        try:
            entry, load, fresh = self.models.use(model)
        except Exception as exc:  # noqa: BLE001 - as the real executor
            return [exc] * len(batch)
        self.calls.append((model, len(batch), self.loads.busy, fresh))
        return [Inference([IMAGE], 2, {}, 0.0, entry.load_waited(load, r.enqueued), 0.0, 0.0) for r in batch]


def engine_with(models: GatedModels, **kwargs: Any) -> tuple[Engine, Calls, ModelLoads]:
    loads = ModelLoads(models, **kwargs)
    calls = Calls(models, loads)
    engine = Engine(BatchPolicy(max_images=2, max_wait=0.0), calls, slots=None, loads=loads)
    return engine, calls, loads


def test_the_engine_serves_resident_models_while_another_loads_beside_it() -> None:
    # Given a worker holding a, and b's load held open by the test
    models = GatedModels(budget=2000)
    models.get("a")
    models.gates["b"] = threading.Event()
    engine, calls, loads = engine_with(models)
    # When a job for b arrives first, then one for a
    b = request("b")
    engine._submit(b, announced=False)
    until(lambda: models.loading == ["a", "b"])
    a = request("a", priority=0)
    engine._submit(a, announced=False)
    # Then a's call runs while b is still loading
    assert a.future.result(10).model_load == 0.0
    assert calls.calls == [("a", 1, True, False)] and not b.future.done()
    # And once b is resident its jobs run in one call, each reporting the part of the load it waited for
    time.sleep(0.05)
    late = request("b")
    engine._submit(late, announced=False)
    models.gates["b"].set()
    inference, came_late = b.future.result(10), late.future.result(10)
    assert calls.calls[-1] == ("b", 2, False, True)
    assert inference.model_load > came_late.model_load + 0.04 and came_late.model_load >= 0.0
    assert (models.misses, models.hits, loads.started) == (2, 1, 1)  # one miss for b, no hit
    assert models.resident == ["a", "b"]


def test_a_load_evicts_a_model_in_a_call_only_when_the_call_ends() -> None:
    # Given a (600 of 1000 bytes) claimed by a running call
    models = GatedModels(budget=1000)
    models.get("a")
    assert models.claim("a")
    # When b (700) loads beside it
    loader = threading.Thread(target=models.load_beside, args=("b",))
    loader.start()
    # Then a is leaving: still there for its call, but no new call may claim it
    until(lambda: not models.is_resident("a"))
    assert models.resident == ["a"] and not models.claim("a")
    time.sleep(0.05)
    assert loader.is_alive() and models.resident_bytes() == 600  # never over budget
    # And when the call ends, a goes and b comes
    models.release("a")
    loader.join(10)
    assert models.resident == ["b"] and models.evictions == 1


def test_a_load_evicts_idle_models_first_and_waits_for_the_last_call_of_a_busy_one() -> None:
    # Given c (300 bytes, least recently used) idle, and a (600) claimed by two calls, one of which ends
    models = GatedModels(budget=1000)
    models.get("c")
    models.get("a")
    assert models.claim("a") and models.claim("a")
    models.release("a")
    # When b (700) loads beside them
    loader = threading.Thread(target=models.load_beside, args=("b",))
    loader.start()
    # Then c goes at once, and a, still in a call, only when that call ends
    until(lambda: "c" not in models.resident)
    time.sleep(0.05)
    assert loader.is_alive() and models.resident == ["a"]
    models.release("a")
    loader.join(10)
    assert models.resident == ["b"] and models.evictions == 2


def test_jobs_that_waited_for_a_failed_load_fail_with_its_error_and_the_engine_goes_on() -> None:
    models = GatedModels(budget=1000)
    engine, calls, loads = engine_with(models)
    # When two jobs wait for a model larger than the budget (its load fails once both are there)
    models.gates["huge"] = threading.Event()
    huge = [request("huge"), request("huge")]
    for r in huge:
        engine._submit(r, announced=False)
    until(lambda: models.loading == ["huge"])
    models.gates["huge"].set()
    # Then its jobs fail with the load's error, without a call
    for r in huge:
        with pytest.raises(JobError) as failure:
            r.future.result(10)
        assert failure.value.code == ErrorCode.MODEL_TOO_LARGE
    assert calls.calls == []
    # And the engine goes on with the next model
    a = request("a")
    engine._submit(a, announced=False)
    a.future.result(10)
    assert [c[0] for c in calls.calls] == ["a"] and loads.started == 2


def test_enough_jobs_for_the_first_call_stop_the_worker_taking_more_once() -> None:
    models = GatedModels(budget=2000)
    models.gates["b"] = threading.Event()
    told: list[str] = []
    engine, calls, loads = engine_with(models, enough=told.append)
    first = request("b")
    engine._submit(first, announced=False)
    until(lambda: models.loading == ["b"])
    assert told == []  # one job: room for more in its first call (max_images 2)
    rest = [request("b") for _ in range(3)]
    for r in rest:
        engine._submit(r, announced=False)
    until(lambda: told == ["b"])
    time.sleep(0.05)
    assert told == ["b"]  # once per load
    models.gates["b"].set()
    for r in [first, *rest]:
        r.future.result(10)
    assert [c[1] for c in calls.calls] == [2, 2]  # the held jobs fill the first calls


def test_a_load_beside_the_engine_keeps_the_resident_models_hot_queues() -> None:
    # Given a worker holding a and serving a, b and c
    subs = QueueSubscriptions(["a", "b", "c"])
    subs.initial(["a"])
    subs.attach(RecordingConsumer())
    before = set(subs.consumed())
    # When b loads beside the engine
    with subs.loading_beside("b"):
        # Then the worker reads b's queues and a's hot queue, not the cold queues of models it would have to load
        assert set(subs.consumed()) == {hot_queue("a"), cold_queue("b")}
        # And once it holds enough of b's jobs, only a's
        subs.loading_enough("b")
        assert set(subs.consumed()) == {hot_queue("a")}
    assert set(subs.consumed()) == before
    # A load on the engine thread reads only the loading model's queues, and "enough" does not apply to it
    with subs.loading_model("b"):
        subs.loading_enough("b")
        assert set(subs.consumed()) == {cold_queue("b")}


def test_a_worker_loads_beside_its_engine_unless_it_compiles_or_is_told_not_to() -> None:
    from types import SimpleNamespace

    from darkroom.worker.context import WorkerContext
    from darkroom.worker.settings import WorkerSettings

    models, queues = SimpleNamespace(on_load=None, on_load_beside=None), QueueSubscriptions(["m"])
    ctx = WorkerContext(*([None] * 7), models, None, queues=queues)  # type: ignore[arg-type]
    # a load beside the engine pauses the subscriptions' other models and wakes the heartbeat to announce it
    assert not ctx.state.wake.is_set()
    with models.on_load_beside("m"):
        assert queues.loading == "m" and queues.beside and ctx.state.wake.is_set()
    assert queues.loading is None
    cache = GatedModels()
    assert ModelLoads.for_worker(WorkerSettings(), cache, queues) is not None
    assert ModelLoads.for_worker(WorkerSettings(load_beside=False), cache, queues) is None
    assert ModelLoads.for_worker(WorkerSettings(compile=True), cache, queues) is None


def test_a_load_started_before_any_job_is_reported_by_the_engine() -> None:
    # Given an idle worker's engine that has never run a job (its thread starts with the first job), holding a
    models = GatedModels(budget=2000)
    models.get("a")
    reports: list[list[str]] = []
    loads = ModelLoads(models)
    engine = Engine(BatchPolicy(max_images=2, max_wait=0.0), Calls(models, loads), slots=None, loads=loads,
                    after_batch=lambda: reports.append(list(models.resident)))
    # When its assist thread loads b first, with no job of b taken yet
    assert loads.start("b")
    # Then the engine reports the load once it ends (the report is what makes the worker read b's hot queue)
    until(lambda: reports == [["a", "b"]])
    # And a job of b then runs without waiting for any load
    job = request("b")
    engine._submit(job, announced=False)
    assert job.future.result(10).model_load == 0.0
