"""The engine thread: the one thread that owns the pipelines; task threads hand it prepared jobs.

The worker runs Celery's thread pool with a few task slots. Each slot takes one message, leases
the job, fetches and decodes its input (I/O that overlaps the pipeline call in progress), then
:meth:`Engine.infer` queues it and waits. The single engine thread picks a *group* of queued jobs
that can share one pipeline call (same :class:`~.call.BatchKey`: model, adapter set, scheduler,
effective steps, guidance, size), runs it, and hands each job its own images back; the slot then
screens, encodes, uploads and commits while the engine already runs the next group.

Pipelines are touched by the engine thread only (a diffusers pipeline called from two threads
returns wrong images, silently): model loads, adapter switches, scheduler swaps and the call.

Which group runs next (:meth:`BatchPolicy.choose`):

- a group runs as soon as it is full (``max_images`` samples or ``max_pixels``), or its oldest
  job has waited ``max_wait``, or nothing could join it (no job is being prepared and every
  task slot is taken, so no message can arrive);
- among ready groups, interactive before bulk, then the oldest first. So a job incompatible with
  everything else waits at most ``max_wait`` for batching, plus the call already running;
- after a call, if interactive messages wait in the broker for this worker (``interactive_waiting``), a bulk
  group waits up to ``interactive_hold`` seconds for them: the call's own slots free as its outputs are
  uploaded, the broker then delivers the interactive message (priority 0) into one, and it runs next instead
  of after a whole bulk call more. A worker whose task slots all hold bulk work would otherwise start its
  next prepared bulk group at once, and an interactive job would wait for two calls.

A failure inside a batched call (an injected fault, out of memory) is not blamed on the whole
batch: each of its jobs runs again alone, so only the job that fails alone fails.

With :class:`~.loads.ModelLoads` (eager workers, by default) a job whose model is not resident does not stop
the engine: its model loads on the loader thread while calls for resident models go on, and its group runs
once the model is resident. The engine claims each call's model, so a load that needs the memory evicts it
only after the call. Jobs that waited for a load that failed fail with its error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from darkroom.common.jobs import Img2ImgJob

from .batching import BatchPolicy
from .call import BatchKey, WorkItem

if TYPE_CHECKING:
    from PIL.Image import Image

    from .loads import ModelLoads

__all__ = ["Engine", "Inference", "Request", "Slot", "mark_batch_wide"]

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]


@dataclass(eq=False)
class Request:
    """One prepared job waiting for the pipeline."""

    item: WorkItem
    key: BatchKey
    on_step: StepCallback | None = None
    priority: int = 0  # 0 = interactive, served first
    enqueued: float = field(default_factory=time.monotonic)
    future: Future[Inference] = field(default_factory=Future)
    cancelled: bool = False

    @property
    def job(self) -> Img2ImgJob:
        return self.item.job

    @property
    def images(self) -> int:
        return len(self.item.seeds)

    @property
    def pixels(self) -> int:
        width, height = self.item.image.size
        return width * height * self.images


@dataclass(frozen=True)
class Inference:
    """What the engine hands back to one job: its images and how they were made."""

    images: list[Image]
    steps_run: int
    details: dict[str, Any]  # scheduler, adapters, model source ... for result.json
    batch_wait: float
    model_load: float
    adapters: float
    inference: float
    latents: list[Any] | None = None  # each image's final latents, when the job asked for them


class Slot:
    """A task thread's place in the engine while it prepares one job (see :meth:`Engine.preparing`)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._announced = True

    def infer(self, request: Request, timeout: float | None = None) -> Inference:
        """Queue the prepared job and wait for its images (or raise its error)."""
        self._engine._submit(request, self._announced)
        self._announced = False
        return request.future.result(timeout)

    def close(self) -> None:
        if self._announced:
            self._announced = False
            self._engine._withdraw()


Executor = Callable[[list[Request]], list["Inference | BaseException"]]


class Engine:
    """The inference thread: gathers requests into batches and runs them one call at a time."""

    def __init__(self, policy: BatchPolicy, execute: Executor, *, slots: int | None = None,
                 after_batch: Callable[[], None] | None = None, name: str = "darkroom-engine",
                 interactive_waiting: Callable[[], bool] | None = None, interactive_hold: float = 0.0,
                 loads: ModelLoads | None = None) -> None:
        self.policy = policy
        self.loads = loads  # None: a model loads inside the call that needs it, on this thread
        self.slots = slots  # task slots of the worker; None: unknown (more jobs may always come)
        self.interactive_waiting = interactive_waiting  # whether interactive messages wait in the broker for us
        self.interactive_hold = interactive_hold  # longest a bulk group waits for them after a call (seconds)
        self.holds = 0  # calls after which a bulk group waited for interactive messages
        self._busy = 0
        self._execute = execute
        self._after_batch = after_batch
        self._pending: list[Request] = []
        self._arriving = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._name = name
        self.batches = 0
        self.batched_jobs = 0
        self.busy_since: float | None = None  # monotonic start of the call running now (the stall watchdog)
        self.split_batches = 0
        self._loads_seen = 0  # loads ended that the after-batch hook has reported
        self._enough_noted = 0  # the load (its number) whose model was noted to have enough jobs waiting
        self._news: tuple[bool, str | None] = (False, None)  # (a load ended, loading model with enough jobs)
        if loads is not None:
            loads.bind(self._wake)

    # -- task threads --------------------------------------------------------
    @contextmanager
    def occupied(self) -> Iterator[None]:
        """Count a task slot as taken (a delivery in progress) for the duration of the block."""
        with self._cond:
            self._busy += 1
        try:
            yield
        finally:
            with self._cond:
                self._busy -= 1
                self._cond.notify_all()

    @contextmanager
    def preparing(self) -> Iterator[Slot]:
        """Announce a job being prepared (it may join a batch soon); submit it through the slot.

        The announcement ends when the job is submitted (atomically with its queueing) or when the
        block exits (the job failed before reaching the pipeline), so the engine never waits for a
        job that is not coming.
        """
        slot = Slot(self)
        with self._cond:
            self._arriving += 1
        try:
            yield slot
        finally:
            slot.close()

    def infer(self, request: Request, timeout: float | None = None) -> Inference:
        """Queue ``request`` and wait for its result (or its exception)."""
        with self.preparing() as slot:
            return slot.infer(request, timeout)

    def _submit(self, request: Request, announced: bool) -> None:
        self._ensure_started()
        with self._cond:
            request.enqueued = time.monotonic()
            self._pending.append(request)
            if announced:
                self._arriving -= 1
            self._cond.notify_all()

    def _withdraw(self) -> None:
        with self._cond:
            self._arriving -= 1
            self._cond.notify_all()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    # -- the engine thread ---------------------------------------------------
    def _ensure_started(self) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()

    def _wake(self) -> None:
        """A load beside the engine ended: the engine reports it (its thread starts here if no job came yet,
        as for a model an idle worker loads first to assist with it)."""
        self._ensure_started()
        with self._cond:
            self._cond.notify_all()

    def _loop(self) -> None:
        hold_until: float | None = None
        while True:
            batch = self._next_batch(hold_until)
            if not batch:  # news from a load beside the engine
                self._report_loads()
                continue
            self.busy_since = time.monotonic()
            try:
                self._run(batch)
            except BaseException as exc:  # noqa: BLE001 - the engine must never die with jobs waiting
                log.exception("engine error; failing the batch")
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(exc)
            finally:
                if self.loads is not None:
                    self.loads.release(batch[0].key.model)
            self.busy_since = None
            self._after()
            hold_until = self._interactive_hold()

    def _after(self) -> None:
        if self._after_batch is not None:
            try:
                self._after_batch()
            except Exception:  # noqa: BLE001 - reporting is best effort
                log.exception("after-batch hook failed")

    def _report_loads(self) -> None:
        """Outside the lock: a load ended (the report and subscriptions follow the resident models), or the
        loading model has enough jobs waiting (stop taking more)."""
        with self._cond:
            (ended, enough), self._news = self._news, (False, None)
        if enough is not None and self.loads is not None:
            self.loads.enough(enough)
        if ended:
            self._after()

    def _loads_step(self) -> list[Request]:
        """With loads beside the engine (lock held): fail jobs whose load failed, start the next load, note news;
        return the requests a call may take now (their model is resident)."""
        loads = self.loads
        assert loads is not None
        if loads.ended != self._loads_seen:
            self._loads_seen = loads.ended
            self._news = (True, self._news[1])
        waiting = [r for r in self._pending if not loads.runnable(r.key.model)]
        for model in {r.key.model for r in waiting}:
            failed = loads.failure(model)
            if failed is None:
                continue
            when, exc = failed
            for request in [r for r in waiting if r.key.model == model and r.enqueued <= when]:
                self._pending.remove(request)
                waiting.remove(request)
                request.future.set_exception(exc)
        if waiting and not loads.busy:
            first = min(waiting, key=lambda r: (r.priority, r.enqueued))  # interactive, then the oldest
            loads.start(first.key.model)
        loading = loads.loading
        if loading is not None and self._enough_noted != loads.started \
                and sum(r.images for r in waiting if r.key.model == loading) >= self.policy.max_images:
            self._enough_noted = loads.started  # once per load
            self._news = (self._news[0], loading)
        return [r for r in self._pending if loads.runnable(r.key.model)]

    def _interactive_hold(self) -> float | None:
        """Until when bulk groups wait for interactive messages that wait in the broker (None: they do not)."""
        if self.interactive_waiting is None or self.interactive_hold <= 0:
            return None
        with self._cond:
            if not any(r.priority > 0 for r in self._pending):
                return None  # no bulk group to hold back: no need to ask the broker
            if self.slots is not None and self._arriving == 0 and self._busy >= self.slots \
                    and self._busy <= len(self._pending):
                return None  # every slot holds a job waiting here: no message can arrive, holding only idles
        try:
            waiting = self.interactive_waiting()
        except Exception as exc:  # noqa: BLE001 - a Redis blip must not stop the engine; bulk just runs
            log.debug("could not look for waiting interactive jobs: %s", exc)
            return None
        if not waiting:
            return None
        self.holds += 1
        return time.monotonic() + self.interactive_hold

    def _next_batch(self, hold_until: float | None = None) -> list[Request]:
        """The next group to run; empty when there is news from a load to report first."""
        with self._cond:
            while True:
                now = time.monotonic()
                pending = self._pending if self.loads is None else self._loads_step()
                if self._news != (False, None):
                    return []
                can_grow = self._arriving > 0 or self.slots is None or self._busy < self.slots
                batch, wake = self.policy.choose(pending, now, can_grow)
                if batch and hold_until is not None and now < hold_until and min(r.priority for r in batch) > 0:
                    # a bulk group is ready, but interactive work is on its way: it waits, and an interactive
                    # group already here runs when it is ready (compatible bulk jobs still fill its call)
                    _, due = self.policy.choose([r for r in pending if r.priority == 0], now, can_grow)
                    batch, wake = [], hold_until if due is None else min(due, hold_until)
                if batch and self.loads is not None and not self.loads.claim(batch[0].key.model):
                    continue  # a load began evicting its model just now: its jobs wait for it to load again
                if batch:
                    chosen = set(map(id, batch))
                    self._pending = [r for r in self._pending if id(r) not in chosen]
                    return batch
                self._cond.wait(None if wake is None else max(0.0, wake - now))

    def _run(self, batch: list[Request]) -> None:
        outcomes = self._execute(batch)
        if len(batch) > 1 and any(_splittable(o) for o in outcomes):
            failed = next(o for o in outcomes if _splittable(o))
            log.warning("a batch of %d jobs failed (%s: %s); running each of them alone", len(batch),
                        type(failed).__name__, failed)
            self.split_batches += 1
            for request in batch:
                self._run([request])
            return
        self.batches += 1
        self.batched_jobs += len(batch)
        for request, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                request.future.set_exception(outcome)
            else:
                request.future.set_result(outcome)


def _splittable(outcome: Inference | BaseException) -> bool:
    """Errors of the shared call (not of one job's own checks) are retried job by job."""
    return isinstance(outcome, BaseException) and getattr(outcome, "batch_wide", False)


def mark_batch_wide(exc: BaseException) -> BaseException:
    """Tag an exception raised by the shared pipeline call (see :meth:`Engine._run`)."""
    exc.batch_wide = True  # type: ignore[attr-defined]
    return exc
