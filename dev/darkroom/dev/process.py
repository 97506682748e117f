"""Start and stop ``darkroom worker`` as a child process (used by the demo, tests and benchmarks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import redis

from darkroom.common.fleet import worker_key

__all__ = ["WorkerProcess"]


class WorkerProcess:
    """A worker subprocess; ``start`` returns once it has announced itself in Redis."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        *,
        env: Mapping[str, str],
        redis_url: str,
        log_path: Path,
    ) -> None:
        self.name = name
        self.args = list(args)
        self.env = {**os.environ, **env, "DARKROOM_WORKER_NAME": name}
        self.redis_url = redis_url
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> WorkerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "darkroom.worker", "worker", *self.args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        client = self._redis()
        deadline = time.monotonic() + timeout
        try:
            while not client.exists(worker_key(self.name)):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"worker {self.name} exited with {self.proc.returncode}; see {self.log_path}:\n"
                                       + self.tail())
                if time.monotonic() > deadline:
                    self.kill()
                    raise TimeoutError(f"worker {self.name} not ready after {timeout} s; see {self.log_path}")
                time.sleep(0.1)
        finally:
            client.close()
        return self

    def _redis(self) -> redis.Redis:
        """A client of the worker's Redis: through its Sentinels when its environment names them."""
        if not self.env.get("DARKROOM_REDIS_SENTINELS"):
            return redis.Redis.from_url(self.redis_url)
        from darkroom.common.clients import make_redis
        from darkroom.common.settings import Settings

        ha = {k.removeprefix("DARKROOM_").lower(): v for k, v in self.env.items()
              if k.startswith(("DARKROOM_REDIS_SENTINEL", "DARKROOM_REDIS_MASTER_NAME"))}
        return make_redis(Settings.model_validate({"redis_url": self.redis_url, **ha}))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        """Warm shutdown (SIGTERM: finish the running job), then SIGKILL after ``timeout``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
