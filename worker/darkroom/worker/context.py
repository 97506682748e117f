"""The worker process's long-lived resources, built once at start-up (never at import).

Tasks receive them through :class:`WorkerContext`, like arq's ``ctx``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from darkroom.common.clients import make_redis, make_s3_client
from darkroom.common.jobstore import JobStore
from darkroom.common.objectstore import ObjectStore

from .device import DeviceInfo, select_device
from .pipelines import PipelineCache
from .registry import ModelRegistry
from .settings import WorkerSettings

__all__ = ["WorkerContext", "Heartbeat", "worker_key"]

log = logging.getLogger(__name__)


def worker_key(name: str) -> str:
    return f"darkroom:worker:{name}"


@dataclass
class WorkerContext:
    """What a task needs: settings, clients, the device and the resident models."""

    settings: WorkerSettings
    name: str
    device: DeviceInfo
    redis: redis.Redis
    jobs: JobStore
    store: ObjectStore
    models: PipelineCache
    started_at: float = field(default_factory=time.time)
    jobs_done: int = 0

    @classmethod
    def build(cls, settings: WorkerSettings, registry: ModelRegistry) -> WorkerContext:
        device = select_device(settings.device, settings.dtype)
        client = make_redis(settings)
        store = ObjectStore(make_s3_client(settings))
        models = PipelineCache(
            registry, device, store, settings.state_dir / "cache" / "models",
            allow_pickle=settings.allow_pickle_weights,
        )
        name = settings.worker_name or f"darkroom-{socket.gethostname()}-{os.getpid()}"
        return cls(settings, name, device, client, JobStore(client, ttl_seconds=settings.status_ttl_seconds),
                   store, models)

    def describe(self) -> dict[str, Any]:
        """What this worker reports about itself (device, memory, models)."""
        return {
            "name": self.name,
            "pid": os.getpid(),
            "device": self.device.device,
            "device_name": self.device.name,
            "dtype": self.device.dtype,
            "free_memory": self.device.free_memory(),
            "total_memory": self.device.total_memory,
            "models": self.models.registry.ids,
            "resident_models": self.models.resident,
            "jobs_done": self.jobs_done,
            "started_at": self.started_at,
            "heartbeat_at": time.time(),
        }


class Heartbeat:
    """Announces the worker in Redis (``darkroom:worker:{name}``, short TTL) from a daemon thread.

    It only does I/O; it never touches a pipeline.
    """

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="darkroom-heartbeat", daemon=True)

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(redis.RedisError):
            self.ctx.redis.delete(worker_key(self.ctx.name))

    def beat(self) -> None:
        ttl = max(3, int(self.ctx.settings.heartbeat_seconds * 3))
        self.ctx.redis.set(worker_key(self.ctx.name), json.dumps(self.ctx.describe()), ex=ttl)

    def _run(self) -> None:
        while not self._stop.wait(self.ctx.settings.heartbeat_seconds):
            try:
                self.beat()
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
