"""The live fleet as workers announce it in Redis, and the queue routing built on it.

Each worker process keeps ``darkroom:worker:{name}`` (JSON, a short TTL) fresh:
device, memory, the models it serves and those it holds resident. Producers
route a job to the model's hot queue when some live worker holds the model
resident, else to its cold queue, where any worker serving it can cold-load it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis

from .queues import cold_queue, hot_queue

__all__ = ["WorkerInfo", "Fleet", "worker_key", "WORKER_PREFIX"]

WORKER_PREFIX = "darkroom:worker:"


def worker_key(name: str) -> str:
    return WORKER_PREFIX + name


@dataclass(frozen=True)
class WorkerInfo:
    """One live worker process, as it last reported itself."""

    name: str
    data: dict[str, Any]

    @property
    def resident_models(self) -> list[str]:
        return list(self.data.get("resident_models", []))

    @property
    def models(self) -> list[str]:
        return list(self.data.get("models", []))


class Fleet:
    """Reads the live workers; caches the view for ``ttl`` seconds (routing needs no fresher)."""

    def __init__(self, client: redis.Redis, *, ttl: float = 1.0) -> None:
        self.redis = client
        self.ttl = ttl
        self._cached: tuple[float, list[WorkerInfo]] | None = None

    def workers(self, *, fresh: bool = False) -> list[WorkerInfo]:
        now = time.monotonic()
        if not fresh and self._cached is not None and now - self._cached[0] < self.ttl:
            return self._cached[1]
        keys = sorted(self.redis.scan_iter(match=WORKER_PREFIX + "*", count=500))
        values = self.redis.mget(keys) if keys else []
        found = []
        for key, raw in zip(keys, values, strict=True):
            if raw is None:
                continue
            name = (key.decode() if isinstance(key, bytes) else str(key))[len(WORKER_PREFIX):]
            found.append(WorkerInfo(name, json.loads(raw)))
        self._cached = (now, found)
        return found

    def holders(self, model_id: str) -> list[str]:
        """Names of live workers with ``model_id`` resident."""
        return [w.name for w in self.workers() if model_id in w.resident_models]

    def queue_for(self, model_id: str) -> str:
        """The model's hot queue when a live worker holds it resident, else its cold queue."""
        return hot_queue(model_id) if self.holders(model_id) else cold_queue(model_id)
