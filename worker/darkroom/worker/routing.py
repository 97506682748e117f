"""Which queues this worker consumes, and the sweep that keeps no job stranded.

Fair share (:mod:`darkroom.common.fairness`): a :class:`FairFeeder` thread releases the bulk work
producers hold per model onto the model's queue (hot or cold, decided at release) by producer weight.

A worker consumes, in this order of preference, the hot queue of each model it
holds resident (producers send a model's jobs there while any worker holds it)
and the cold queue of every model it serves (jobs for models resident nowhere;
it cold-loads them). When a model stops being resident anywhere, the jobs still
in its hot queue are moved, in order and keeping their priority, to its cold
queue: a job never waits for a worker that will not come.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import redis

from darkroom.common.fairness import Feeder, producers_key
from darkroom.common.fleet import Fleet
from darkroom.common.producers import ProducerRegistry
from darkroom.common.queues import broker_list, cold_queue, hot_queue, priority_keys

__all__ = ["FairFeeder", "QueueSubscriptions", "sweep_orphaned_queues", "priority_keys"]

log = logging.getLogger(__name__)


class QueueSubscriptions:
    """The consumer's queue set: hot queues of resident models, then cold queues of served models, plus the
    hot queues of models this worker assists with (:mod:`darkroom.common.assist`) and does not hold yet."""

    def __init__(self, served: Iterable[str] = ()) -> None:
        self.consumer: Any | None = None
        self.served = list(served)
        self.current: set[str] = set()
        self.adopted: dict[str, float] = {}  # model assisted with, not resident yet -> since (monotonic)
        self.warming: dict[str, float] = {}  # model loading first to assist with it (its jobs are not read yet)
        self.resident: list[str] = []
        self.loading: str | None = None  # the model the engine is loading now: only its queues are read meanwhile
        self.beside = False  # the load runs beside the engine: the resident models' hot queues are read too
        self.loading_full = False  # enough of the loading model's jobs are held: its queues are not read
        self._lock = threading.Lock()

    def initial(self, resident: Iterable[str]) -> list[str]:
        self.resident = list(resident)
        queues = [hot_queue(m) for m in self.resident] + [cold_queue(m) for m in self.served]
        self.current = set(queues)
        return queues

    def attach(self, consumer: Any) -> None:
        """Take the consumer (once Celery is ready) and apply what changed since :meth:`initial`: a model
        adopted, loaded or evicted before the consumer was ready would otherwise not be followed."""
        with self._lock:
            self.consumer = consumer
            resident = list(self.resident)
        self.sync(resident)

    def sync(self, resident: Iterable[str]) -> None:
        """Start consuming newly resident models' queues; stop for evicted ones."""
        with self._lock:
            self.resident = list(resident)
            for model in self.resident:  # a model assisted with that has loaded: a holder like any other
                self.adopted.pop(model, None)
                self.warming.pop(model, None)
            if self.consumer is None:
                return
            wanted = ({hot_queue(m) for m in self.resident} | {cold_queue(m) for m in self.served}
                      | {hot_queue(m) for m in self.adopted})
            if self.loading is not None:  # no new work the engine cannot start before the load ends
                keep = set() if self.loading_full else {hot_queue(self.loading), cold_queue(self.loading)}
                if self.beside:
                    keep |= {hot_queue(m) for m in self.resident}
                wanted &= keep
            for queue in sorted(wanted - self.current):
                self.consumer.add_task_queue(queue)
            for queue in sorted(self.current - wanted):
                self.consumer.cancel_task_queue(queue)
            self.current = wanted

    @contextmanager
    def loading_model(self, model: str, beside: bool = False) -> Iterator[None]:
        """While ``model`` loads (seconds to a minute), read no queue but the model's own: a job of another
        model taken now would wait for the whole load, where a worker holding that model may be free; other
        workers' share of a flood also stays in the queue for them.

        ``beside``: the load runs beside the engine (:mod:`.inference.loads`), which keeps serving the resident
        models, so their hot queues are read too; :meth:`loading_enough` then stops taking the loading model's
        jobs, so that task slots stay free for them."""
        with self._lock:
            # a model loaded first to assist with it: none of its jobs until it is resident
            self.loading, self.beside, self.loading_full = model, beside, beside and model in self.warming
            resident = list(self.resident)
        self.sync(resident)
        try:
            yield
        finally:
            with self._lock:
                self.loading, self.beside, self.loading_full = None, False, False
                self.warming.pop(model, None)  # loaded (its report adds its hot queue) or failed: over either way
                resident = list(self.resident)
            self.sync(resident)

    def loading_beside(self, model: str) -> AbstractContextManager[None]:
        """:meth:`loading_model` for a load beside the engine."""
        return self.loading_model(model, beside=True)

    def loading_enough(self, model: str) -> None:
        """The worker holds enough of the loading ``model``'s jobs for its first call: take no more until it is
        resident (a load beside the engine only)."""
        with self._lock:
            if self.loading != model or not self.beside:
                return
            self.loading_full = True
            resident = list(self.resident)
        self.sync(resident)

    def consumed(self) -> list[str]:
        """The queues the consumer reads now."""
        with self._lock:
            return sorted(self.current)

    def interactive_waiting(self, client: redis.Redis) -> bool:
        """Whether any queue the consumer reads holds interactive messages (priority 0), in one round trip."""
        queues = self.consumed()
        if not queues:
            return False
        pipe = client.pipeline(transaction=False)
        for queue in queues:
            pipe.llen(broker_list(queue, 0))
        return any(int(n) > 0 for n in pipe.execute())

    def adopt(self, model: str) -> None:
        """Consume ``model``'s hot queue before holding the model (its first job loads it)."""
        with self._lock:
            self.adopted[model] = time.monotonic()
            resident = list(self.resident)
        self.sync(resident)

    def warm(self, model: str) -> None:
        """``model`` is about to load beside the engine to assist with it: read none of its queues during the
        load (its jobs stay in the broker for workers that can run them now), its hot queue once it is resident."""
        with self._lock:
            self.warming[model] = time.monotonic()

    def warming_model(self) -> str | None:
        """The model loading first to assist with it, if any (for the worker's report)."""
        with self._lock:
            return next(iter(self.warming), None)

    def cool(self, model: str) -> None:
        """The load :meth:`warm` announced did not start."""
        with self._lock:
            self.warming.pop(model, None)

    def drop_stale(self, hold_seconds: float) -> list[str]:
        """Stop consuming the hot queues of models assisted with more than ``hold_seconds`` ago and still not
        resident (no job came: others drained the queue); return them."""
        now = time.monotonic()
        with self._lock:
            stale = [m for m, since in self.adopted.items() if now - since > hold_seconds]
            for model in stale:
                del self.adopted[model]
            resident = list(self.resident)
        if stale:
            self.sync(resident)
        return stale


def sweep_orphaned_queues(client: redis.Redis, fleet: Fleet, model_ids: Iterable[str]) -> int:
    """Move jobs out of the queues of models no live worker holds; return how many moved."""
    moved = 0
    for model_id in model_ids:
        if fleet.holders(model_id):
            continue
        for source, target in zip(priority_keys(hot_queue(model_id)), priority_keys(cold_queue(model_id)),
                                  strict=True):
            # newest end of the orphaned list -> oldest end of the general one: order is kept
            while client.lmove(source, target, "LEFT", "RIGHT") is not None:
                moved += 1
    if moved:
        log.info("moved %d job(s) from hot queues of models resident nowhere to their cold queues", moved)
    return moved


IDLE_SECONDS = 1.0
"""How often a feeder looks for held work while none is held (then every ``interval``)."""


class FairFeeder:
    """Releases held bulk jobs of the models this worker serves, every ``interval`` seconds, from a daemon thread.

    Every worker of a pool runs one; each release is one script, so together they keep each model's bulk list
    at about ``depth`` messages. Weights come from the producer registry (read at most every 5 s).
    """

    def __init__(self, client: redis.Redis, models: Iterable[str], *, depth: int, interval: float) -> None:
        self.redis = client
        self.models = list(models)
        self.feeder = Feeder(client, depth=depth)
        self.fleet = Fleet(client)
        self.interval = interval
        self._weights: tuple[float, dict[str, float]] = (-1e9, {})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="darkroom-fair-share", daemon=True)

    def weights(self) -> dict[str, float]:
        at, found = self._weights
        if time.monotonic() - at > 5.0:
            found = {p.id: p.weight for p in ProducerRegistry(self.redis).all() if p.weight != 1.0}
            self._weights = (time.monotonic(), found)
        return found

    def step(self) -> int | None:
        """One release for each served model with held work; the messages released (None: nothing is held)."""
        pipe = self.redis.pipeline(transaction=False)
        for model in self.models:
            pipe.exists(producers_key(model))
        held = [m for m, found in zip(self.models, pipe.execute(), strict=True) if found]
        if not held:
            return None
        weights = self.weights()
        return sum(self.feeder.feed(m, self.fleet.queue_for(m), weights) for m in held)

    def start(self) -> FairFeeder:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        pause = self.interval
        while not self._stop.wait(pause):
            try:
                pause = self.interval if self.step() is not None else IDLE_SECONDS  # one EXISTS a second when idle
            except Exception as exc:  # noqa: BLE001 - the feeder must outlive Redis blips
                log.warning("fair-share release failed: %s", exc)
                pause = IDLE_SECONDS
