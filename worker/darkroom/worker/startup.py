"""Where a worker's start-up seconds go: stages from the process's start to Celery's ``ready``, logged once.

``darkroom worker`` marks each stage as it ends (imports, settings and service clients, model preload,
the consumer) and, once Celery says ready, logs one line such as::

    ready 4.31 s after the process started: interpreter 0.36 s, imports 1.92 s, services 0.28 s,
    models 1.61 s, consumer 0.14 s

The first stage runs from the process's start, read from ``/proc`` (Linux; elsewhere from when this
module was imported), to the first mark: the interpreter and the ``darkroom`` command line itself.
``bench/coldstart.py`` reads this line to name where a cold start's seconds go.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any

__all__ = ["StartupClock", "parse_ready_line", "process_started_at"]

log = logging.getLogger("darkroom.worker")
_IMPORTED_AT = time.time()
READY_PREFIX = "ready "
_READY = re.compile(r"ready (\d+\.\d+) s after the process started: ([^\"]*)")
_STAGE = re.compile(r"([a-z][a-z +/-]*?) (\d+\.\d+) s")


def process_started_at(pid: int | str = "self", *, proc: str = "/proc",
                       now: Callable[[], float] = time.time) -> float | None:
    """When process ``pid`` started (epoch seconds, 1/CLK_TCK resolution), or None where ``/proc`` cannot say.

    Its age is the system's uptime minus the process's start (both counted from boot, so neither the
    boot time's whole-second rounding nor clock adjustments since boot blur it), subtracted from now.
    """
    try:
        with open(f"{proc}/{pid}/stat") as handle:
            stat = handle.read()
        with open(f"{proc}/uptime") as handle:
            uptime = float(handle.read().split()[0])
        ticks = int(stat[stat.rindex(")") + 2:].split()[19])  # field 22 (starttime), after "pid (comm) "
    except (OSError, ValueError, IndexError):
        return None
    return now() - max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))


class StartupClock:
    """Seconds spent in each start-up stage; :meth:`mark` ends the stage running now under its name."""

    def __init__(self, started_at: float | None = None, now: Callable[[], float] = time.time) -> None:
        self._now = now
        started = started_at if started_at is not None else process_started_at()
        self.started_at = min(started if started is not None else _IMPORTED_AT, now())
        self._last = self.started_at
        self.stages: dict[str, float] = {}

    def mark(self, stage: str) -> None:
        at = self._now()
        self.stages[stage] = self.stages.get(stage, 0.0) + max(0.0, at - self._last)
        self._last = at

    @property
    def elapsed(self) -> float:
        """Seconds from the process's start to the last mark."""
        return self._last - self.started_at

    def describe(self) -> str:
        parts = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.stages.items())
        return f"{READY_PREFIX}{self.elapsed:.2f} s after the process started: {parts}"

    def log_when_ready(self, app: Any, stage: str = "consumer") -> None:
        """Mark ``stage`` and log :meth:`describe` once ``app``'s Celery worker is ready (consuming)."""
        from celery import signals

        def ready(sender: Any, **_: Any) -> None:
            if getattr(sender, "app", None) is app and stage not in self.stages:
                self.mark(stage)
                log.info("%s", self.describe())

        signals.worker_ready.connect(ready, weak=False)


def parse_ready_line(line: str) -> tuple[float, dict[str, float]] | None:
    """The total and the stages of a :meth:`StartupClock.describe` line (or a log line holding one), or None."""
    found = _READY.search(line)
    if found is None:
        return None
    return float(found.group(1)), {name.strip(): float(value) for name, value in _STAGE.findall(found.group(2))}
