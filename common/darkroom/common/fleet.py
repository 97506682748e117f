"""The live fleet as workers announce it in Redis, and the queue routing built on it.

Each worker process keeps ``darkroom:worker:{name}`` (JSON, a short TTL) fresh:
device, memory, the models it serves and those it holds resident. Producers
route a job to the model's hot queue when some live worker holds the model
resident, else to its cold queue, where any worker serving it can cold-load it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import redis
import redis.asyncio
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .families import Family
from .queues import cold_queue, hot_queue

__all__ = ["WorkerReport", "CurrentJob", "CacheCounts", "ModelTimes", "WorkerInfo", "Fleet", "AsyncFleet", "worker_key", "route", "WORKER_PREFIX", "CATALOG_KEY"]

WORKER_PREFIX = "darkroom:worker:"
WORKERS_KEY = "darkroom:workers"  # names of workers that announced themselves (no keyspace SCAN needed)
CATALOG_KEY = "darkroom:models"
FAMILIES_KEY = "darkroom:models:families"  # model id -> family (sd, sdxl, sd3, flux), when known
CATALOG_TTL_SECONDS = 7 * 24 * 3600
REPORT_SCHEMA_VERSION = 1
T = TypeVar("T")
log = logging.getLogger(__name__)


def worker_key(name: str) -> str:
    return WORKER_PREFIX + name


class CurrentJob(BaseModel):
    """A job the worker runs now, and since when (epoch seconds)."""

    job_id: str
    since: float


class CacheCounts(BaseModel):
    """The worker's model cache: loads served from memory, cold loads, evictions."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0


class ModelTimes(BaseModel):
    """How long one resident model took to load here, and how long its recent pipeline calls took per image."""

    load_seconds: float = 0.0
    image_seconds: float | None = None  # moving average over calls; None before the first call


class WorkerReport(BaseModel):
    """What a worker announces on every heartbeat (``darkroom:worker:{name}``, JSON, a short TTL).

    Written by the worker, read by routing, the CLI, the dashboard and the autoscaler's helpers.
    Versioned and read tolerantly: fields a newer worker adds are kept, missing ones take defaults.
    """

    model_config = ConfigDict(extra="allow")

    schema_version: int = REPORT_SCHEMA_VERSION
    name: str
    pid: int | None = None
    host: str | None = None
    device: str = ""
    device_name: str = ""
    dtype: str = ""
    tuning: dict[str, Any] = Field(default_factory=dict)
    total_memory: int | None = None
    free_memory: int | None = None
    models: list[str] = Field(default_factory=list, description="Models it serves.")
    resident_models: list[str] = Field(default_factory=list, description="Models loaded now (hot queues).")
    resident_bytes: int = 0
    memory_budget: int = 0
    resident_adapters: dict[str, list[str]] = Field(default_factory=dict)
    cache: CacheCounts = Field(default_factory=CacheCounts)
    model_times: dict[str, ModelTimes] = Field(default_factory=dict, description="Per resident model.")
    loading_model: str | None = Field(None, description="The model loading beside its engine now (a holder soon).")
    assist_loading: str | None = Field(None, description="The model it loads first to help with (none of its "
                                                         "jobs taken yet: DARKROOM_ASSIST_LOAD_FIRST).")
    adapter_switches: int = 0
    jobs_done: int = 0
    started_at: float = 0.0
    heartbeat_at: float = 0.0
    current_jobs: list[CurrentJob] = Field(default_factory=list)

    @classmethod
    def read(cls, name: str, raw: str | bytes) -> WorkerReport:
        """The report in ``raw``; an unreadable one becomes an empty report of ``name`` (logged, never raised)."""
        try:
            return cls.model_validate({**json.loads(raw), "name": name})
        except (ValueError, TypeError, ValidationError) as exc:
            log.warning("unreadable report of worker %s: %s", name, str(exc).splitlines()[0])
            return cls(name=name)


@dataclass(frozen=True)
class WorkerInfo:
    """One live worker process, as it last reported itself."""

    name: str
    report: WorkerReport

    @property
    def resident_models(self) -> list[str]:
        return self.report.resident_models

    @property
    def models(self) -> list[str]:
        return self.report.models

    @property
    def data(self) -> dict[str, Any]:
        """The report as plain JSON data (unknown fields included)."""
        return self.report.model_dump(mode="json")


class Fleet:
    """Reads the live workers; caches the view for ``ttl`` seconds (routing needs no fresher)."""

    def __init__(self, client: redis.Redis, *, ttl: float = 1.0) -> None:
        self.redis = client
        self.ttl = ttl
        self._workers: _Cached[list[WorkerInfo]] = _Cached(ttl)
        self._catalog: _Cached[dict[str, Family | None]] = _Cached(ttl)

    def workers(self, *, fresh: bool = False) -> list[WorkerInfo]:
        if not fresh and (hit := self._workers.get()) is not None:
            return hit
        names = sorted(n.decode() if isinstance(n, bytes) else str(n) for n in self.redis.smembers(WORKERS_KEY))
        keys = [worker_key(n) for n in names]
        values = self.redis.mget(keys) if keys else []
        gone = [n for n, v in zip(names, values, strict=True) if v is None]
        if gone:  # announcements that expired: the worker died or stopped
            self.redis.srem(WORKERS_KEY, *gone)
        return self._workers.put(parse_workers(keys, values))

    def announce(self, report: WorkerReport, ttl_seconds: int) -> None:
        """A worker's heartbeat: its report under a short TTL, and its name in the set of workers."""
        name = report.name
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(worker_key(name), report.model_dump_json(), ex=ttl_seconds)
        pipe.sadd(WORKERS_KEY, name)
        pipe.execute()

    def withdraw(self, name: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(worker_key(name))
        pipe.srem(WORKERS_KEY, name)
        pipe.execute()

    def register_models(self, model_ids: list[str], families: dict[str, Family] | None = None) -> None:
        """Record that this fleet serves these models, and their families where known (kept when workers
        scale to zero)."""
        if model_ids:
            now = time.time()
            pipe = self.redis.pipeline(transaction=False)
            pipe.hset(CATALOG_KEY, mapping={m: now for m in model_ids})
            if families:
                pipe.hset(FAMILIES_KEY, mapping={m: f.value for m, f in families.items()})
            pipe.execute()
            self._catalog.clear()

    def catalog(self) -> dict[str, Family | None]:
        """Models some worker served in the last week, with their families (None: not known); empty if no
        worker ever started (cached ``ttl``)."""
        if (hit := self._catalog.get()) is not None:
            return hit
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(CATALOG_KEY)
        pipe.hgetall(FAMILIES_KEY)
        models, families = pipe.execute()
        return self._catalog.put(with_families(parse_catalog(models), families))

    def holders(self, model_id: str) -> list[str]:
        """Names of live workers with ``model_id`` resident."""
        return holders(self.workers(), model_id)

    def queue_for(self, model_id: str) -> str:
        """The model's hot queue when a live worker holds it resident, else its cold queue."""
        return route(self.workers(), model_id)


class AsyncFleet:
    """:class:`Fleet`'s reads over a ``redis.asyncio`` client (for the asyncio SDK), cached the same way."""

    def __init__(self, client: redis.asyncio.Redis, *, ttl: float = 1.0) -> None:
        self.redis = client
        self._workers: _Cached[list[WorkerInfo]] = _Cached(ttl)
        self._catalog: _Cached[dict[str, Family | None]] = _Cached(ttl)

    async def workers(self) -> list[WorkerInfo]:
        if (hit := self._workers.get()) is not None:
            return hit
        names = sorted(n.decode() if isinstance(n, bytes) else str(n) for n in await self.redis.smembers(WORKERS_KEY))
        keys = [worker_key(n) for n in names]
        values = await self.redis.mget(keys) if keys else []
        return self._workers.put(parse_workers(keys, values))

    async def catalog(self) -> dict[str, Family | None]:
        if (hit := self._catalog.get()) is not None:
            return hit
        models = await self.redis.hgetall(CATALOG_KEY)
        families = await self.redis.hgetall(FAMILIES_KEY)
        return self._catalog.put(with_families(parse_catalog(models), families))

    async def queue_for(self, model_id: str) -> str:
        return route(await self.workers(), model_id)


def parse_workers(keys: list[Any], values: list[Any]) -> list[WorkerInfo]:
    """Workers from their heartbeat keys and JSON values (expired ones, read as None, are skipped)."""
    found = []
    for key, raw in zip(keys, values, strict=True):
        if raw is None:
            continue
        name = (key.decode() if isinstance(key, bytes) else str(key))[len(WORKER_PREFIX):]
        found.append(WorkerInfo(name, WorkerReport.read(name, raw)))
    return found


def parse_catalog(raw: dict[Any, Any]) -> list[str]:
    """Model ids of the catalog hash that some worker registered within ``CATALOG_TTL_SECONDS``."""
    cutoff = time.time() - CATALOG_TTL_SECONDS
    return sorted((k.decode() if isinstance(k, bytes) else str(k)) for k, v in raw.items() if float(v) >= cutoff)


def with_families(models: list[str], raw: dict[Any, Any]) -> dict[str, Family | None]:
    """``models`` with their families from the families hash (unknown or unreadable: None)."""
    known: dict[str, Family] = {}
    for key, value in raw.items():
        try:
            known[key.decode() if isinstance(key, bytes) else str(key)] = Family(
                value.decode() if isinstance(value, bytes) else str(value))
        except ValueError:
            continue  # a family this version does not know: checked by the worker instead
    return {m: known.get(m) for m in models}


def holders(workers: list[WorkerInfo], model_id: str) -> list[str]:
    return [w.name for w in workers if model_id in w.resident_models]


def route(workers: list[WorkerInfo], model_id: str) -> str:
    """The model's hot queue when one of ``workers`` holds it resident, else its cold queue."""
    return hot_queue(model_id) if holders(workers, model_id) else cold_queue(model_id)


class _Cached(Generic[T]):
    """One value, fresh for ``ttl`` seconds."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entry: tuple[float, T] | None = None

    def get(self) -> T | None:
        if self._entry is not None and time.monotonic() - self._entry[0] < self.ttl:
            return self._entry[1]
        return None

    def put(self, value: T) -> T:
        self._entry = (time.monotonic(), value)
        return value

    def clear(self) -> None:
        self._entry = None
