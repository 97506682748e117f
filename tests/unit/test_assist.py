"""Assist's decision: which model an idle worker may help with (the Redis side is in tests/integration)."""

from __future__ import annotations

from typing import Any

from darkroom.common.assist import Candidate, candidates, helper_places
from darkroom.common.fleet import ModelTimes, WorkerInfo, WorkerReport

from ..helpers import RecordingConsumer

GB = 10**9


def worker(name: str, resident: dict[str, int], times: dict[str, ModelTimes] | None = None) -> WorkerInfo:
    return WorkerInfo(name, WorkerReport(name=name, resident_models=list(resident),
                                         resident_bytes=sum(resident.values()), memory_budget=16 * GB,
                                         model_times=times or {}))


FLEET = [worker("w1", {"sd": 2 * GB}), worker("w2", {"xl": 7 * GB}), worker("w3", {"sd": 2 * GB, "xl": 7 * GB}),
         worker("me", {"other": 2 * GB})]


def test_a_deep_hot_queue_of_a_model_that_fits_is_a_candidate_with_places_by_depth() -> None:
    found = candidates({"sd": 40, "xl": 3}, FLEET, me="me", free_bytes=10 * GB, queue_depth=16)
    # sd: held by w1 and w3; its size is the smallest holder's resident bytes (w1: 2 GB)
    assert found == [Candidate("sd", 40, 2, 2)]


def test_deepest_backlog_per_holder_first() -> None:
    found = candidates({"sd": 40, "xl": 60}, FLEET, me="me", free_bytes=10 * GB, queue_depth=16)
    assert [(c.model, c.places) for c in found] == [("xl", 3), ("sd", 2)]  # 60 / 2 holders before 40 / 2


def test_no_candidate_below_the_depth_when_it_does_not_fit_or_when_nobody_holds_it() -> None:
    assert candidates({"sd": 15}, FLEET, me="me", free_bytes=10 * GB, queue_depth=16) == []
    # xl (7 GB) would evict one of this worker's models: left to its holders
    assert candidates({"xl": 100}, FLEET, me="me", free_bytes=6 * GB, queue_depth=16) == []
    # resident nowhere: the sweep moves its jobs to the cold queue, which every worker reads anyway
    assert candidates({"new": 100}, FLEET, me="me", free_bytes=10 * GB, queue_depth=16) == []


def test_helpers_stop_where_the_backlog_would_drain_before_their_load_ends() -> None:
    # 0.5 s per image, a 3 s load: 60 waiting images take 30 s for one holder; with n more workers 30 / (1 + n)
    # stays at least one load (3 s) up to n = 9
    holder = [worker("w1", {"sd": 2 * GB}, {"sd": ModelTimes(load_seconds=3.0, image_seconds=0.5)})]
    assert helper_places("sd", 60, holder, queue_depth=4) == 9
    assert helper_places("sd", 60, holder, queue_depth=16) == 3  # the depth per helper still bounds it
    # a slow load against quick images: not worth a single helper
    slow = [worker("w1", {"sd": 2 * GB}, {"sd": ModelTimes(load_seconds=40.0, image_seconds=0.5)})]
    assert helper_places("sd", 60, slow, queue_depth=4) == 0
    assert candidates({"sd": 60}, slow, me="me", free_bytes=10 * GB, queue_depth=4) == []
    # times not reported yet (no call so far): the depth alone decides
    assert helper_places("sd", 60, [worker("w1", {"sd": 2 * GB})], queue_depth=4) == 15


def test_workers_loading_the_model_to_help_count_against_the_places() -> None:
    # the 60 images above are worth 9 helpers; two are loading the model already (they take none of the
    # backlog until it is resident, so the backlog does not show them)
    holder = worker("w1", {"sd": 2 * GB}, {"sd": ModelTimes(load_seconds=3.0, image_seconds=0.5)})
    assert helper_places("sd", 60, [holder], queue_depth=4, loading=2) == 7
    assert helper_places("sd", 60, [holder], queue_depth=16, loading=2) == 1
    loaders = [WorkerInfo(n, WorkerReport(name=n, resident_models=["x"], resident_bytes=GB, memory_budget=16 * GB,
                                          assist_loading="sd")) for n in ("h1", "h2")]
    # a worker loading sd for jobs of its own has taken them from the backlog already: not counted again
    own = WorkerInfo("h3", WorkerReport(name="h3", resident_models=["x"], resident_bytes=GB, memory_budget=16 * GB,
                                        loading_model="sd"))
    found = candidates({"sd": 60}, [holder, *loaders, own], me="me", free_bytes=10 * GB, queue_depth=4)
    assert found == [Candidate("sd", 60, 1, 7)]
    # a report from an older worker (no loading_model field) reads as loading nothing
    old = WorkerReport.read("w9", '{"resident_models": ["x"], "resident_bytes": 1}')
    assert old.assist_loading is None


def test_less_work_per_load_sends_more_helpers() -> None:
    # the same 60 images of 0.5 s and 3 s loads: at half a load of work each, 30 / (1 + n) >= 1.5 up to n = 19
    holder = [worker("w1", {"sd": 2 * GB}, {"sd": ModelTimes(load_seconds=3.0, image_seconds=0.5)})]
    assert helper_places("sd", 60, holder, queue_depth=1, work_per_load=0.5) == 19
    assert helper_places("sd", 60, holder, queue_depth=1, work_per_load=2.0) == 4
    assert helper_places("sd", 60, holder, queue_depth=4, work_per_load=0.5) == 15  # the depth still bounds it
    # and a slow load that was worth no helper at one load each is worth some at a tenth
    slow = [worker("w1", {"sd": 2 * GB}, {"sd": ModelTimes(load_seconds=40.0, image_seconds=0.5)})]
    assert [c.places for c in candidates({"sd": 60}, slow, me="me", free_bytes=10 * GB, queue_depth=4,
                                         work_per_load=0.1)] == [6]


def test_a_model_this_worker_holds_is_never_a_candidate() -> None:
    assert candidates({"sd": 100}, FLEET, me="w1", free_bytes=10 * GB, queue_depth=16) == []


def test_unknown_holder_size_is_not_taken_over() -> None:
    fleet = [WorkerInfo("w1", WorkerReport(name="w1", resident_models=["sd"], resident_bytes=0))]
    assert candidates({"sd": 100}, fleet, me="me", free_bytes=10 * GB, queue_depth=16) == []


def test_a_model_assisted_with_is_consumed_until_it_loads_or_goes_stale() -> None:
    from darkroom.common.queues import hot_queue
    from darkroom.worker.routing import QueueSubscriptions

    subs = QueueSubscriptions(["a", "b"])
    subs.initial(["a"])
    consumer = RecordingConsumer()
    subs.attach(consumer)
    subs.adopt("b")
    assert consumer.calls == [("add", hot_queue("b"))]
    subs.sync(["a", "b"])  # b loaded: kept, now as a resident model's queue
    assert subs.adopted == {} and consumer.calls == [("add", hot_queue("b"))]
    subs.sync(["a"])  # evicted later: dropped as usual
    assert consumer.calls[-1] == ("cancel", hot_queue("b"))
    subs.adopt("b")
    assert subs.drop_stale(hold_seconds=3600) == []
    assert subs.drop_stale(hold_seconds=0) == ["b"]  # no job came: stop consuming it
    assert consumer.calls[-2:] == [("add", hot_queue("b")), ("cancel", hot_queue("b"))]


def test_a_model_loaded_first_to_help_is_read_only_once_it_is_resident() -> None:
    from darkroom.common.queues import cold_queue, hot_queue
    from darkroom.worker.routing import QueueSubscriptions

    # Given a worker holding a and serving a, b and c, about to load b beside its engine to help with it
    subs = QueueSubscriptions(["a", "b", "c"])
    subs.initial(["a"])
    consumer = RecordingConsumer()
    subs.attach(consumer)
    subs.warm("b")
    assert hot_queue("b") not in subs.consumed()
    # When b loads beside the engine
    with subs.loading_beside("b"):
        during = set(subs.consumed())
    # Then meanwhile it reads a's hot queue (the engine serves a) and none of b's queues: b's jobs stay in the
    # broker for its holders
    assert during == {hot_queue("a")}
    # And once b is resident (the engine's report syncs the subscriptions) it reads b's hot queue as a holder
    subs.sync(["a", "b"])
    assert hot_queue("b") in subs.consumed() and cold_queue("c") in subs.consumed()
    assert subs.warming == {} and subs.adopted == {}
    # A load that never started is forgotten
    subs.warm("c")
    subs.cool("c")
    assert subs.warming == {}


def test_a_model_adopted_before_the_consumer_is_ready_is_consumed_once_it_is() -> None:
    from darkroom.common.queues import hot_queue
    from darkroom.worker.routing import QueueSubscriptions

    # Given a worker whose assist thread adopts b before Celery's consumer is ready
    subs = QueueSubscriptions(["a", "b"])
    subs.initial(["a"])
    subs.adopt("b")
    consumer = RecordingConsumer()
    # When the consumer attaches
    subs.attach(consumer)
    # Then it reads b's hot queue too (it used to start from the initial queues only, and never read it)
    assert consumer.calls == [("add", hot_queue("b"))]
    assert hot_queue("b") in subs.consumed()


def test_while_a_model_loads_the_worker_reads_only_that_models_queues() -> None:
    from darkroom.common.queues import cold_queue, hot_queue
    from darkroom.worker.routing import QueueSubscriptions

    # Given a worker holding a and serving a, b and c, helping with b (its first job loads b)
    subs = QueueSubscriptions(["a", "b", "c"])
    subs.initial(["a"])
    consumer = RecordingConsumer()
    subs.attach(consumer)
    subs.adopt("b")
    before = set(subs.consumed())
    consumer.calls.clear()
    # When the engine loads b, and a batch ends meanwhile (the report refreshes the subscriptions)
    with subs.loading_model("b"):
        during = set(subs.consumed())
        subs.sync(["a"])
        assert set(subs.consumed()) == during
    # Then meanwhile it reads b's queues only, so other models' jobs go to workers that can start them
    assert during == {hot_queue("b"), cold_queue("b")}
    assert sorted(q for action, q in consumer.calls if action == "cancel") == sorted(before - during)
    # And afterwards every queue is read again, b's hot queue now as a holder's
    subs.sync(["a", "b"])
    assert set(subs.consumed()) == before


def test_a_worker_context_pauses_its_queues_around_every_model_load() -> None:
    from darkroom.worker.pipelines import PipelineCache

    # Given the cache's load hook (the worker context sets it to its queue subscriptions' pause)
    seen: list[str] = []

    class Recording(PipelineCache):
        def __init__(self) -> None:  # no registry or files: only get()'s hook is exercised
            self.registry = type("R", (), {"get": staticmethod(lambda model_id: model_id)})()
            self._resident = __import__("collections").OrderedDict()
            self.hits = self.misses = self.evictions = 0
            self.budget_bytes = 1
            self.on_load = None
            self._lock = __import__("threading").Condition()

        def _load(self, spec: Any) -> Any:
            seen.append(f"load {spec}")
            return type("E", (), {"uses": 0, "last_used": 0.0, "unreported_load": None})()

        def _evict_until_within_budget(self, keep: str) -> None:
            pass

    from contextlib import contextmanager

    @contextmanager
    def pause(model: str) -> Any:
        seen.append(f"pause {model}")
        yield
        seen.append(f"resume {model}")

    cache = Recording()
    cache.on_load = pause
    # When a model is loaded, then used again
    cache.get("m")
    cache.get("m")
    # Then the load, and only the load, ran inside the pause
    assert seen == ["pause m", "load m", "resume m"]
    # And a worker context wires its cache's loads to its queue subscriptions
    from types import SimpleNamespace

    from darkroom.worker.context import WorkerContext
    from darkroom.worker.routing import QueueSubscriptions

    models, queues = SimpleNamespace(on_load=None), QueueSubscriptions(["m"])
    WorkerContext(*([None] * 7), models, None, queues=queues)  # type: ignore[arg-type]
    assert models.on_load == queues.loading_model
