"""The worker's side of assist (policy: :mod:`darkroom.common.assist`): a daemon thread that, while the
worker is idle, looks for a model whose hot queue its holders cannot keep up with and joins them.

By default it reads the model's hot queue at once and its first job loads the model. With
``DARKROOM_ASSIST_LOAD_FIRST`` (and loads beside the engine: eager workers) it loads the model first and reads
its hot queue only once the model is resident: the jobs stay in the broker meanwhile, where the holders and
the helpers that have loaded already take them, instead of waiting out this worker's load in its task slots;
it reports the model it is loading for that (``WorkerReport.assist_loading``), so that other idle workers
count it against the model's helper places."""

from __future__ import annotations

import logging
import threading

from darkroom.common.assist import candidates, claim, hot_backlogs
from darkroom.common.fleet import Fleet

from .context import WorkerContext

__all__ = ["Assist"]

log = logging.getLogger(__name__)


class Assist:
    """Every ``interval`` seconds, while no job runs here: drop a stale assist, else start one if due."""

    def __init__(self, ctx: WorkerContext, *, queue_depth: int, interval: float, hold: float,
                 work_per_load: float = 1.0, load_first: bool = False) -> None:
        self.ctx = ctx
        self.load_first = load_first
        self.fleet = Fleet(ctx.redis)
        self.queue_depth = queue_depth
        self.work_per_load = work_per_load
        self.interval = interval
        self.hold = hold
        self.assisted = 0  # models assisted since start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="darkroom-assist", daemon=True)

    def step(self) -> str | None:
        """One look; the model this worker starts assisting now, if any."""
        queues = self.ctx.queues
        if self.ctx.state.current_jobs():
            return None  # busy: only idle capacity helps elsewhere
        queues.drop_stale(self.hold)
        report = self.ctx.state.report
        loads = self.ctx.state.loads
        if queues.warming and (loads is None or not loads.busy):  # its load ended without the load hook (the model
            for model in list(queues.warming):  # was resident already): nothing to wait for
                queues.cool(model)
        if queues.adopted or queues.warming or report is None:
            return None  # one model at a time, until it loads (or goes stale)
        others = [m for m in report.models if m not in report.resident_models]
        backlogs = hot_backlogs(self.ctx.redis, others)
        if max(backlogs.values(), default=0) < self.queue_depth:
            return None
        free = max(0, report.memory_budget - report.resident_bytes)
        for candidate in candidates(backlogs, self.fleet.workers(), me=self.ctx.name, free_bytes=free,
                                    queue_depth=self.queue_depth, work_per_load=self.work_per_load):
            if claim(self.ctx.redis, candidate, ttl_seconds=2 * self.interval):
                if self.load_first and loads is not None:
                    queues.warm(candidate.model)
                    if not loads.start(candidate.model):  # another load runs: look again next time
                        queues.cool(candidate.model)
                        return None
                else:
                    queues.adopt(candidate.model)
                log.info("assisting with model %s%s: %d messages wait for %d holder(s)", candidate.model,
                         " (loading it first)" if self.load_first and loads is not None else "", candidate.backlog,
                         candidate.holders)
                self.assisted += 1
                return candidate.model
        return None

    def start(self) -> Assist:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - a Redis blip must not end the thread
                log.warning("assist check failed: %s", exc)
