"""One worker process per GPU: ``darkroom worker --gpus all|0,1,...``.

The supervisor starts a child ``darkroom worker`` per GPU with
``CUDA_VISIBLE_DEVICES`` set to that GPU alone (so each child sees exactly one
device, ``cuda:0``), forwards SIGTERM/SIGINT for a warm shutdown, and restarts a
child that dies (a crashed or recycled worker), with backoff. Without a GPU it
runs a single CPU worker in-process.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from darkroom.common.errors import ConfigurationError

__all__ = ["ChildSpec", "plan_children", "Supervisor", "cuda_device_count"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChildSpec:
    """One child worker: the GPU it owns and its environment overrides."""

    gpu: int
    name: str
    env: dict[str, str]


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan_children(gpus: str, device_count: int, base_name: str, metrics_port: int = 9464) -> list[ChildSpec]:
    """Children for ``--gpus`` (``all`` or ``0,1,...``); empty when there is no GPU and ``all`` was asked."""
    if gpus.strip() == "all":
        indices = list(range(device_count))
    else:
        try:
            indices = sorted({int(part) for part in gpus.split(",") if part.strip()})
        except ValueError:
            raise ConfigurationError(f"--gpus wants 'all' or GPU indices like 0,1; got {gpus!r}") from None
        missing = [i for i in indices if i < 0 or i >= device_count]
        if missing:
            raise ConfigurationError(f"--gpus {gpus}: no GPU {missing} here ({device_count} visible)")
    return [
        ChildSpec(i, f"{base_name}-gpu{i}", {"CUDA_VISIBLE_DEVICES": str(i), "DARKROOM_DEVICE": "cuda:0",
                                             "DARKROOM_WORKER_NAME": f"{base_name}-gpu{i}",
                                             "DARKROOM_METRICS_PORT": str(metrics_port + i) if metrics_port else "0"})
        for i in indices
    ]


@dataclass
class _Child:
    spec: ChildSpec
    proc: subprocess.Popen[bytes]
    started: float
    restarts: int = 0


@dataclass
class Supervisor:
    """Runs and watches the children until told to stop."""

    children: list[ChildSpec]
    args: Sequence[str]
    max_backoff: float = 60.0
    _running: list[_Child] = field(default_factory=list)
    _stopping: bool = False

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        self._running = [self._spawn(spec) for spec in self.children]
        while not self._stopping:
            time.sleep(0.5)
            for index, child in enumerate(self._running):
                if child.proc.poll() is not None and not self._stopping:
                    self._running[index] = self._restart(child)
        return self._wait_all()

    def _spawn(self, spec: ChildSpec, restarts: int = 0) -> _Child:
        env = {**os.environ, **spec.env}
        proc = subprocess.Popen([sys.executable, "-m", "darkroom.worker", "worker", *self.args], env=env)
        log.info("started %s (pid %d) on GPU %d", spec.name, proc.pid, spec.gpu)
        return _Child(spec, proc, time.monotonic(), restarts)

    def _restart(self, child: _Child) -> _Child:
        lived = time.monotonic() - child.started
        restarts = 0 if lived > 300 else child.restarts + 1
        delay = min(self.max_backoff, 2.0 ** restarts) if restarts else 0.0
        log.warning("%s exited with %s after %.0f s; restarting in %.0f s", child.spec.name,
                    child.proc.returncode, lived, delay)
        time.sleep(delay)
        return self._spawn(child.spec, restarts)

    def _stop(self, signum: int, _frame: object) -> None:
        self._stopping = True
        for child in self._running:
            if child.proc.poll() is None:
                child.proc.send_signal(signum)

    def _wait_all(self) -> int:
        codes = [child.proc.wait() for child in self._running]
        return max((abs(c) for c in codes), default=0)
