"""The worker's cancel desk: a daemon thread that answers signed cancel requests (see
:mod:`darkroom.common.cancels`). Any worker serves any request; it only does Redis I/O."""

from __future__ import annotations

import logging
import threading

from darkroom.common.cancels import CancelDesk
from darkroom.common.errors import ErrorCode

from .context import WorkerContext

__all__ = ["CancelListener"]

log = logging.getLogger(__name__)


class CancelListener:
    """Takes cancel requests off their list, one at a time, until stopped."""

    def __init__(self, ctx: WorkerContext) -> None:
        def refused(code: ErrorCode) -> None:
            ctx.metrics.refused.labels(code=code.value).inc()

        self.desk = CancelDesk(ctx.redis, ctx.lifecycle, ctx.gate.lookup,
                               max_age_seconds=ctx.settings.signature_max_age_seconds, on_refused=refused)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="darkroom-cancels", daemon=True)

    def start(self) -> CancelListener:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.desk.serve_once(timeout=1.0)
            except Exception as exc:  # noqa: BLE001 - the desk must outlive Redis blips
                log.warning("cancel desk: %s", exc)
                self._stop.wait(1.0)
