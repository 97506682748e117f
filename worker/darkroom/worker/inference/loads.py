"""Model loads beside the engine: the engine keeps serving resident models while a new one loads.

A model load takes seconds to a minute (an SDXL checkpoint from object storage). Run on the engine thread,
it stops every call: an interactive job for a model the worker holds waits behind a flood's cold load.
:class:`ModelLoads` runs one load at a time on its own thread instead (:meth:`.PipelineCache.load_beside`);
the engine (:mod:`.engine`) starts it for the oldest waiting job whose model is not resident, runs calls for
resident models meanwhile, and runs the new model's jobs once it is resident. Loads do not overlap one
another: each may need the memory the previous one took.

Memory stays within the budget: the load evicts least recently used models first, and a model in a call is
only marked leaving (the engine claims it for no new call) and evicted when that call ends.

While a load runs, the worker reads the loading model's queues and its resident models' hot queues
(:meth:`.routing.QueueSubscriptions.loading_model`); once enough of the loading model's jobs wait for its
first full call (:meth:`enough`), it stops taking more of them, so task slots stay free for the work it
can run now.

Compiled workers load on the engine thread as before (compiling beside a running compiled model is not
something torch promises to be safe), and so does a worker with ``DARKROOM_LOAD_BESIDE=false``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..pipelines import PipelineCache

if TYPE_CHECKING:
    from ..routing import QueueSubscriptions
    from ..settings import WorkerSettings

__all__ = ["ModelLoads"]

log = logging.getLogger(__name__)


class ModelLoads:
    """One model load at a time on a loader thread; the engine asks it which models a call may use now."""

    def __init__(self, models: PipelineCache, *, enough: Callable[[str], None] | None = None) -> None:
        self.models = models
        self._enough = enough  # the loading model has jobs for a full first call (the subscriptions stop taking)
        self._lock = threading.Lock()
        self.loading: str | None = None
        self.loading_since: float | None = None  # monotonic start of the load running now (the stall watchdog)
        self.ended = 0  # loads finished, failed or not (the engine refreshes its report when this moves)
        self.started = 0
        self._failed: dict[str, tuple[float, BaseException]] = {}  # model -> (when, why) until the engine reads it
        self._notify: Callable[[], None] = lambda: None
        self._enough_sent: str | None = None

    @classmethod
    def for_worker(cls, settings: WorkerSettings, models: PipelineCache, queues: QueueSubscriptions
                   ) -> ModelLoads | None:
        """A worker's loads beside its engine (``DARKROOM_LOAD_BESIDE``); None for a compiled worker, whose
        loads (and compiles) stay on the engine thread."""
        if not settings.load_beside or settings.compile:
            return None
        return cls(models, enough=queues.loading_enough)

    def bind(self, notify: Callable[[], None]) -> None:
        """How a finished load wakes the engine (called from the loader thread, holding no lock of the cache)."""
        self._notify = notify

    @property
    def busy(self) -> bool:
        with self._lock:
            return self.loading is not None

    def runnable(self, model: str) -> bool:
        """Whether a call for ``model`` could run now (resident and not leaving for a load)."""
        return self.models.is_resident(model)

    def claim(self, model: str) -> bool:
        return self.models.claim(model)

    def release(self, model: str) -> None:
        self.models.release(model)

    def start(self, model: str) -> bool:
        """Begin loading ``model`` on the loader thread (False: a load is running already)."""
        with self._lock:
            if self.loading is not None:
                return False
            self.loading, self.loading_since = model, time.monotonic()
            self.started += 1
            self._enough_sent = None
        threading.Thread(target=self._run, args=(model,), name=f"darkroom-load-{model}", daemon=True).start()
        return True

    def failure(self, model: str) -> tuple[float, BaseException] | None:
        """The last failed load of ``model`` (monotonic time it ended, its error), once; None if none."""
        with self._lock:
            return self._failed.pop(model, None)

    def enough(self, model: str) -> None:
        """Enough of the loading ``model``'s jobs are waiting: stop taking more until it is resident (once per
        load; called by the engine thread outside its own lock)."""
        with self._lock:
            if self.loading != model or self._enough_sent == model:
                return
            self._enough_sent = model
        if self._enough is not None:
            try:
                self._enough(model)
            except Exception:  # noqa: BLE001 - taking a few more jobs than needed is harmless
                log.exception("could not stop taking jobs for %s", model)

    def _run(self, model: str) -> None:
        try:
            self.models.load_beside(model)
        except BaseException as exc:  # noqa: BLE001 - the jobs waiting for it fail with this error
            log.warning("loading model %s beside the engine failed: %s", model, exc)
            with self._lock:
                self._failed[model] = (time.monotonic(), exc)
        finally:
            with self._lock:
                self.loading, self.loading_since = None, None
                self.ended += 1
            self._notify()
