"""The worker process's long-lived resources, built once at start-up (never at import).

Tasks receive them through :class:`WorkerContext`, like arq's ``ctx``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import redis

from darkroom.common.boundaries import ReferencePolicy
from darkroom.common.clients import make_redis, make_s3_client
from darkroom.common.fleet import Fleet
from darkroom.common.identity import Gate
from darkroom.common.jobstore import JobStore
from darkroom.common.lifecycle import Lifecycle
from darkroom.common.objectstore import ObjectStore
from darkroom.common.quotas import WorkerQuota
from darkroom.common.tenancy import PolicyCheck

from .device import DeviceInfo, select_device
from .filecache import FileCache
from .metrics import WorkerMetrics
from .pipelines import PipelineCache
from .recovery import Reconciler, reclaim_abandoned
from .registry import ModelRegistry
from .routing import QueueSubscriptions, sweep_orphaned_queues
from .screening import Screening
from .settings import WorkerSettings
from .tuning import Tuning

__all__ = ["WorkerContext", "Heartbeat"]

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """What a task needs: settings, clients, the device, the resident models and the safety checker."""

    settings: WorkerSettings
    name: str
    device: DeviceInfo
    redis: redis.Redis
    jobs: JobStore
    store: ObjectStore
    files: FileCache
    models: PipelineCache
    screening: Screening
    started_at: float = field(default_factory=time.time)
    jobs_done: int = 0
    report: dict[str, Any] = field(default_factory=dict)
    heartbeat: Heartbeat | None = None
    queues: QueueSubscriptions = field(default_factory=QueueSubscriptions)
    exit_code: int = 0
    last_heartbeat: float = 0.0
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)
    current_jobs: dict[str, float] = field(default_factory=dict)  # job id -> when it started here (epoch s)
    progress_at: float = field(default_factory=time.monotonic)  # last denoising step of any job (engine thread)
    engine_busy: Any = None  # callable: monotonic time the engine's current call began, or None when idle

    @functools.cached_property
    def lifecycle(self) -> Lifecycle:
        """The owner of every status change (fenced scripts), on this worker's Redis client."""
        s = self.settings
        return Lifecycle(self.redis, ttl_seconds=s.status_ttl_seconds,
                         dead_letter_retention_seconds=s.dead_letter_retention_seconds,
                         dead_letter_max=s.dead_letter_max, outbox_progress_cap=s.outbox_progress_cap)

    @functools.cached_property
    def gate(self) -> Gate:
        """Verifies who sent each message, and that producer's policy, before anything else (identity)."""
        s = self.settings
        return Gate(self.redis, require=s.require_signed_jobs, max_age_seconds=s.signature_max_age_seconds,
                    policy_check=PolicyCheck(ReferencePolicy.from_settings(s)),
                    quota=WorkerQuota(self.redis, ttl_seconds=s.status_ttl_seconds))

    @classmethod
    def build(cls, settings: WorkerSettings, registry: ModelRegistry) -> WorkerContext:
        device = select_device(settings.device, settings.dtype)
        if settings.cpu_threads:
            import torch

            torch.set_num_threads(settings.cpu_threads)
        tuning = Tuning.from_settings(settings)
        tuning.check(device, registry)  # a setting that cannot apply here stops the worker now, not mid-job
        client = make_redis(settings)
        store = ObjectStore(make_s3_client(settings))
        files = FileCache(settings.state_dir / "cache", store, budget_bytes=settings.file_cache_bytes or None,
                          max_adapter_bytes=settings.max_adapter_bytes)
        models = PipelineCache(
            registry, device, files, budget_bytes=settings.model_memory_budget_bytes or device.default_budget(),
            max_adapters=settings.max_adapters, allow_pickle=settings.allow_pickle_weights, tuning=tuning,
        )
        screening = Screening.from_settings(settings, registry, device=device.device)
        name = settings.worker_name or f"darkroom-{socket.gethostname()}-{os.getpid()}"
        return cls(settings, name, device, client, JobStore(client, ttl_seconds=settings.status_ttl_seconds),
                   store, files, models, screening=screening, queues=QueueSubscriptions(registry.ids))

    def refresh_report(self) -> None:
        """Recompute what the worker reports (on the job thread: the heartbeat thread never touches models)."""
        self.report = {
            "name": self.name,
            "pid": os.getpid(),
            "device": self.device.device,
            "device_name": self.device.name,
            "dtype": self.device.dtype,
            "tuning": self.models.tuning.describe(),
            "total_memory": self.device.total_memory,
            "models": self.models.registry.ids,
            "resident_models": self.models.resident,
            "resident_bytes": self.models.resident_bytes(),
            "memory_budget": self.models.budget_bytes,
            "resident_adapters": {m: self.models.get_entry(m).adapters.resident for m in self.models.resident},
            "cache": {"hits": self.models.hits, "misses": self.models.misses, "evictions": self.models.evictions},
            "adapter_switches": sum(self.models.get_entry(m).adapters.switches for m in self.models.resident),
            "jobs_done": self.jobs_done,
            "started_at": self.started_at,
        }

    def after_job(self) -> None:
        """Refresh the report; announce at once when the resident models changed (routing depends on it)."""
        before = self.report.get("resident_models")
        self.refresh_report()
        if before == self.report["resident_models"]:
            return
        self.queues.sync(self.models.resident)
        if self.heartbeat is not None:
            try:
                self.heartbeat.beat()
                self.heartbeat.sweep()
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)

    def describe(self) -> dict[str, Any]:
        """The latest report plus live device memory, the jobs running now and the time (safe from any thread)."""
        current = [{"job_id": j, "since": t} for j, t in list(self.current_jobs.items())]
        return {**self.report, "free_memory": self.device.free_memory(), "current_jobs": current,
                "heartbeat_at": time.time()}

    @contextlib.contextmanager
    def running(self, job_id: str) -> Iterator[None]:
        """Count ``job_id`` among the jobs this worker runs now (its report's ``current_jobs``) while inside."""
        self.current_jobs[job_id] = time.time()
        try:
            yield
        finally:
            self.current_jobs.pop(job_id, None)


class Heartbeat:
    """Announces the worker in Redis (``darkroom:worker:{name}``, short TTL) from a daemon thread.

    It only does I/O; it never touches a pipeline.
    """

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="darkroom-heartbeat", daemon=True)
        s = ctx.settings
        self.reconciler = Reconciler(ctx.redis, ctx.lifecycle, grace_seconds=s.reconcile_grace_seconds,
                                     interval_seconds=s.reconcile_interval_seconds, owner=ctx.name)

    def start(self) -> None:
        Fleet(self.ctx.redis).register_models(self.ctx.models.registry.ids)
        self.beat()
        self._thread.start()

    def sweep(self) -> int:
        """Rescue jobs: from hot queues of models no live worker holds (see :mod:`.routing`) and
        from dead workers' unacknowledged messages (see :mod:`.recovery`)."""
        moved = sweep_orphaned_queues(self.ctx.redis, Fleet(self.ctx.redis, ttl=0), self.ctx.models.registry.ids)
        reclaimed = reclaim_abandoned(self.ctx.redis, older_than=self.ctx.settings.lease_seconds * 1.5)
        reconciled = self.reconciler.run_once() if self.reconciler.due(time.time()) else []
        self.ctx.metrics.reconciled.inc(len(reconciled))
        return moved + len(reclaimed) + len(reconciled)

    def engine_stalled(self, now: float | None = None) -> float | None:
        """Seconds the engine has been in one call with no denoising step, when past ``engine_stall_seconds``."""
        busy_since = self.ctx.engine_busy() if callable(self.ctx.engine_busy) else None
        if busy_since is None:
            return None
        idle = (time.monotonic() if now is None else now) - max(busy_since, self.ctx.progress_at)
        return idle if idle > self.ctx.settings.engine_stall_seconds else None

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(redis.RedisError):
            Fleet(self.ctx.redis).withdraw(self.ctx.name)

    def beat(self) -> None:
        ttl = max(3, int(self.ctx.settings.heartbeat_seconds * 3))
        Fleet(self.ctx.redis).announce(self.ctx.name, json.dumps(self.ctx.describe()), ttl)
        self.ctx.last_heartbeat = time.time()

    def _run(self) -> None:
        while not self._stop.wait(self.ctx.settings.heartbeat_seconds):
            stalled = self.engine_stalled()
            if stalled is not None:  # a pipeline call that never returns cannot be interrupted: recycle
                log.critical("the engine made no denoising step for %.0f s (engine_stall_seconds); recycling this "
                             "worker (exit 75); its jobs are taken over once their leases expire", stalled)
                logging.shutdown()
                os._exit(75)
            try:
                self.beat()
                self.sweep()
            except Exception as exc:  # noqa: BLE001 - the heartbeat must outlive Redis blips
                log.warning("heartbeat failed: %s", exc)
