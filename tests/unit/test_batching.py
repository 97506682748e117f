"""The batcher's choices (a pure policy on a given clock) and its engine thread (with a plain executor)."""

from __future__ import annotations

import itertools
import threading
from typing import Any

import pytest
from PIL import Image

from darkroom.common.errors import JobCancelled
from darkroom.common.jobs import Img2ImgJob
from darkroom.worker.inference.batching import BatchPolicy
from darkroom.worker.inference.call import WorkItem, batch_key
from darkroom.worker.inference.engine import Engine, Inference, Request, mark_batch_wide

IMAGE = Image.new("RGB", (64, 64))
IDS = itertools.count()


def request(steps: int = 4, *, images: int = 1, at: float = 0.0, priority: int = 0, size: int = 64,
            **fields: Any) -> Request:
    values: dict[str, Any] = {"model": "tiny", "image": "s3://inputs/x.png", "prompt": "p", "strength": 1.0,
                              "seed": 1, "num_inference_steps": steps, "num_images_per_prompt": images,
                              "job_id": f"job-{next(IDS)}", **fields}
    job = Img2ImgJob(**values)
    item = WorkItem(job, IMAGE if size == 64 else Image.new("RGB", (size, size)), job.seeds())
    return Request(item, batch_key(item), priority=priority, enqueued=at)


def test_compatible_jobs_share_a_key_and_incompatible_ones_do_not() -> None:
    a, b = request(4), request(4, prompt="other", seed=9)
    assert a.key == b.key  # prompts, seeds and images may differ
    assert request(4, guidance_scale=3.0).key != a.key
    assert request(5).key != a.key
    assert request(4, size=72).key != a.key
    assert request(4, scheduler="ddim").key != a.key
    assert request(4, adapters=[{"uri": "style", "weight": 0.5}]).key != a.key


def test_strengths_that_run_the_same_steps_batch_together() -> None:
    def key(strength: float) -> Any:
        job = Img2ImgJob(model="tiny", image="s3://inputs/x.png", prompt="p", num_inference_steps=20, strength=strength)
        return batch_key(WorkItem(job, IMAGE, [1]))

    assert key(0.50) == key(0.52)  # int(20 * s) == 10 for both: the same timesteps
    assert key(0.50) != key(0.55)


def test_a_full_group_runs_at_once() -> None:
    policy = BatchPolicy(max_images=2, max_wait=10.0)
    pending = [request(at=0.0), request(at=0.1), request(at=0.2)]
    batch, _ = policy.choose(pending, now=0.3)
    assert batch == pending[:2]


def test_a_group_that_can_still_grow_waits_until_its_deadline() -> None:
    policy = BatchPolicy(max_images=4, max_wait=1.0)
    pending = [request(at=0.0), request(at=0.5)]
    batch, wake = policy.choose(pending, now=0.6)
    assert batch == [] and wake == pytest.approx(1.0)
    batch, _ = policy.choose(pending, now=1.0)
    assert batch == pending


def test_a_group_runs_at_once_when_nothing_can_join() -> None:
    policy = BatchPolicy(max_images=4, max_wait=10.0)
    pending = [request(at=0.0)]
    batch, _ = policy.choose(pending, now=0.0, can_grow=False)
    assert batch == pending


def test_an_incompatible_job_is_not_held_back_past_the_maximum_wait() -> None:
    # Given a lone job of one kind and a stream of jobs of another kind that never fills a batch
    policy = BatchPolicy(max_images=8, max_wait=1.0)
    lone = request(steps=6, at=0.0)
    stream = [request(steps=4, at=0.1 * i) for i in range(1, 6)]
    # Before the deadline nothing runs
    assert policy.choose([lone, *stream], now=0.9)[0] == []
    # At the lone job's deadline it runs, although the other group is bigger
    assert policy.choose([lone, *stream], now=1.0)[0] == [lone]


def test_ready_groups_go_interactive_first_then_oldest_first() -> None:
    policy = BatchPolicy(max_images=1, max_wait=0.0)
    bulk_old = request(steps=4, at=0.0, priority=1)
    interactive = request(steps=5, at=0.5, priority=0)
    older = request(steps=6, at=0.1, priority=0)
    assert policy.choose([bulk_old, interactive, older], now=1.0)[0] == [older]
    assert policy.choose([bulk_old, interactive], now=1.0)[0] == [interactive]


def test_within_a_group_interactive_jobs_take_the_places_first() -> None:
    policy = BatchPolicy(max_images=2, max_wait=0.0)
    bulk = [request(at=0.1 * i, priority=1) for i in range(3)]
    interactive = request(at=1.0, priority=0)
    assert policy.choose([*bulk, interactive], now=2.0)[0] == [interactive, bulk[0]]


def test_limits_count_images_and_pixels_and_a_big_job_still_runs_alone() -> None:
    by_images = BatchPolicy(max_images=4, max_wait=0.0)
    pending = [request(images=3, at=0.0), request(images=2, at=0.1)]
    assert by_images.choose(pending, now=1.0)[0] == pending[:1]
    assert by_images.choose([request(images=6)], now=1.0)[0] != []  # larger than a batch: runs alone
    by_pixels = BatchPolicy(max_images=8, max_wait=0.0, max_pixels=2 * 64 * 64)
    pending = [request(at=0.0), request(at=0.1), request(at=0.2)]
    assert by_pixels.choose(pending, now=1.0)[0] == pending[:2]


class Recorder:
    """An executor that records each call's jobs; a job whose prompt says so fails inside a batch."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.lock = threading.Lock()

    def __call__(self, batch: list[Request]) -> list[Inference | BaseException]:
        with self.lock:
            self.calls.append([r.job.job_id or "" for r in batch])
        if any(r.job.prompt == "explode" for r in batch):
            error = RuntimeError("boom")
            if len(batch) > 1:
                mark_batch_wide(error)
            return [error] * len(batch)
        return [Inference([IMAGE], 1, {"batch": {"jobs": len(batch)}}, 0.0, 0.0, 0.0, 0.0) for _ in batch]


def run_together(engine: Engine, requests: list[Request]) -> list[Any]:
    """Each request from its own task thread, all announced as being prepared before any is submitted."""
    results: list[Any] = [None] * len(requests)
    ready = threading.Barrier(len(requests))

    def task(index: int) -> None:
        with engine.occupied(), engine.preparing() as slot:
            ready.wait()
            try:
                results[index] = slot.infer(requests[index], timeout=30)
            except Exception as exc:  # noqa: BLE001 - recorded for the assertion
                results[index] = exc

    threads = [threading.Thread(target=task, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_the_engine_batches_jobs_prepared_together() -> None:
    recorder = Recorder()
    engine = Engine(BatchPolicy(max_images=8, max_wait=30.0), recorder, slots=3)
    requests = [request(at=0.0, prompt=f"p{i}") for i in range(3)]
    results = run_together(engine, requests)
    # every slot is taken and nothing is being prepared: the batch runs without waiting 30 s
    assert len(recorder.calls) == 1
    assert sorted(recorder.calls[0]) == sorted(r.job.job_id for r in requests)
    assert all(isinstance(r, Inference) for r in results)


def test_a_failed_batch_is_retried_job_by_job_and_only_the_culprit_fails() -> None:
    recorder = Recorder()
    engine = Engine(BatchPolicy(max_images=8, max_wait=30.0), recorder, slots=3)
    requests = [request(prompt="fine"), request(prompt="explode"), request(prompt="also fine", seed=3)]
    results = run_together(engine, requests)
    assert len(recorder.calls[0]) == 3 and len(recorder.calls) == 4
    assert isinstance(results[0], Inference) and isinstance(results[2], Inference)
    assert isinstance(results[1], RuntimeError)


def test_a_job_that_fails_before_the_pipeline_does_not_keep_others_waiting() -> None:
    recorder = Recorder()
    engine = Engine(BatchPolicy(max_images=8, max_wait=30.0), recorder, slots=2)
    done, finished = threading.Event(), threading.Event()

    def failing_task() -> None:
        with engine.occupied():
            with engine.preparing():
                done.wait(30)  # fetches... then fails: never submits
            finished.wait(30)  # still recording its failure: its slot stays taken

    failing = threading.Thread(target=failing_task)
    failing.start()
    results: list[Any] = []
    submitter = threading.Thread(target=lambda: results.append(engine.infer(request(), timeout=30)))
    with engine.occupied():
        submitter.start()
        done.set()  # the failing job gives up: both slots are taken, nothing is being prepared
        submitter.join(60)
    finished.set()
    failing.join(60)
    assert len(results) == 1 and isinstance(results[0], Inference)


def test_job_cancelled_is_an_exception_the_runner_can_catch() -> None:
    assert issubclass(JobCancelled, Exception)


class Gated(Recorder):
    """A recorder whose first call blocks until released, so that the test can queue jobs behind it."""

    def __init__(self) -> None:
        super().__init__()
        self.started, self.release = threading.Event(), threading.Event()

    def __call__(self, batch: list[Request]) -> list[Inference | BaseException]:
        first = not self.calls
        outcome = super().__call__(batch)
        if first:
            self.started.set()
            self.release.wait(30)
        return outcome


def in_thread(engine: Engine, req: Request) -> threading.Thread:
    thread = threading.Thread(target=engine.infer, args=(req,), kwargs={"timeout": 30})
    thread.start()
    return thread


def wait_for(condition: Any, seconds: float = 30) -> None:
    stop = threading.Event()
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        stop.wait(0.01)
    raise AssertionError("condition not reached")


def bulk_call_with_one_behind(answer: bool, hold: float) -> tuple[Engine, Gated, list[Request], list[threading.Thread]]:
    """An engine running a bulk call with a second bulk job ready behind it; once the call ends, the broker says
    (once) ``answer`` to whether interactive jobs wait in a queue this worker reads."""
    answers = iter([answer])
    recorder = Gated()
    engine = Engine(BatchPolicy(max_images=8, max_wait=0.0), recorder,
                    interactive_waiting=lambda: next(answers, False), interactive_hold=hold)
    requests = [request(priority=1, prompt="first"), request(priority=1, prompt="behind", steps=5)]
    threads = [in_thread(engine, requests[0])]
    assert recorder.started.wait(30)
    threads.append(in_thread(engine, requests[1]))
    wait_for(lambda: engine.pending == 1)
    return engine, recorder, requests, threads


@pytest.mark.parametrize("waiting", [True, False])
def test_after_a_call_a_bulk_batch_waits_for_interactive_jobs_waiting_in_the_broker(waiting: bool) -> None:
    # Given a bulk call with a bulk job ready behind it, and interactive jobs waiting in the broker (or none)
    engine, recorder, (first, behind), threads = bulk_call_with_one_behind(waiting, hold=30.0)
    # When the call ends, and an interactive job arrives a moment later (its message had to wait for a slot)
    recorder.release.set()
    if waiting:
        wait_for(lambda: engine.holds == 1)
    else:
        wait_for(lambda: len(recorder.calls) == 2)
    urgent = request(priority=0, prompt="urgent", steps=6)
    threads.append(in_thread(engine, urgent))
    for thread in threads:
        thread.join(60)
    # Then with interactive work waiting, the interactive job runs before the bulk job that was ready first;
    # with none, the bulk job runs at once and nothing waits
    order = [call[0] for call in recorder.calls]
    expected = [first, urgent, behind] if waiting else [first, behind, urgent]
    assert order == [r.job.job_id for r in expected]
    assert engine.holds == (1 if waiting else 0)


def test_a_held_bulk_batch_runs_when_no_interactive_job_comes() -> None:
    # Given interactive jobs waiting in the broker after a call, which another worker then takes
    engine, recorder, (first, behind), threads = bulk_call_with_one_behind(True, hold=0.2)
    recorder.release.set()
    for thread in threads:
        thread.join(60)
    # Then the bulk job still runs once the hold is over
    assert [call[0] for call in recorder.calls] == [first.job.job_id, behind.job.job_id] and engine.holds == 1


def test_no_hold_when_every_slot_holds_a_job_waiting_for_the_engine() -> None:
    # Given a worker of one task slot whose only job waits for the engine: no interactive message can arrive
    asked: list[bool] = []

    def waiting() -> bool:
        asked.append(True)
        return True

    engine = Engine(BatchPolicy(max_images=8, max_wait=0.0), Recorder(), slots=1, interactive_waiting=waiting,
                    interactive_hold=30.0)
    with engine.occupied():
        engine._pending.append(request(priority=1))
        # Then the engine does not hold its bulk batch (nor ask the broker)
        assert engine._interactive_hold() is None and asked == []
