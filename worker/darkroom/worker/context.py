"""The worker process's long-lived collaborators (:class:`WorkerContext`, built once at start-up, never at
import; tasks receive it like arq's ``ctx``), its runtime state (:class:`WorkerState`, one lock) and its
heartbeat thread (:class:`Heartbeat`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import redis

from darkroom.common.boundaries import ReferencePolicy
from darkroom.common.clients import make_redis, make_s3_client
from darkroom.common.fleet import CacheCounts, CurrentJob, Fleet, ModelTimes, WorkerReport
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
from .recovery import Rescue
from .registry import ModelRegistry
from .routing import QueueSubscriptions
from .screening import Screening
from .settings import WorkerSettings
from .tuning import Tuning

if TYPE_CHECKING:
    from .inference.loads import ModelLoads
    from .simulate import Simulation

__all__ = ["WorkerContext", "WorkerState", "Heartbeat"]

log = logging.getLogger(__name__)


class WorkerState:
    """What changes while the worker runs, behind one lock: task threads, the engine thread and the
    heartbeat thread all touch it (the report, jobs done and running, the exit code, engine progress)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started_at = time.time()
        self._jobs_done = 0
        self._current: dict[str, float] = {}  # job id -> when it started here (epoch s)
        self._report: WorkerReport | None = None
        self._exit_code = 0
        self._last_heartbeat = 0.0
        self._alive_at = time.time()  # the heartbeat thread's last round, whether Redis answered or not
        self._progress_at = time.monotonic()  # last denoising step of any job (engine thread)
        self._engine_busy: Callable[[], float | None] | None = None
        self._loading_since: Callable[[], float | None] | None = None
        self.loads: ModelLoads | None = None  # the engine's loads beside it (set by the runner; None: on the engine)
        self.wake = threading.Event()  # set: the heartbeat should announce now (resident models changed)

    @property
    def jobs_done(self) -> int:
        with self._lock:
            return self._jobs_done

    def job_done(self) -> None:
        with self._lock:
            self._jobs_done += 1

    @contextlib.contextmanager
    def running(self, job_id: str) -> Iterator[None]:
        """Count ``job_id`` among the jobs this worker runs now (its report's ``current_jobs``) while inside."""
        with self._lock:
            self._current[job_id] = time.time()
        try:
            yield
        finally:
            with self._lock:
                self._current.pop(job_id, None)

    def current_jobs(self) -> list[CurrentJob]:
        with self._lock:
            return [CurrentJob(job_id=j, since=t) for j, t in self._current.items()]

    @property
    def report(self) -> WorkerReport | None:
        """The latest report (None before the first); refreshed on the job thread after each batch."""
        with self._lock:
            return self._report

    def set_report(self, report: WorkerReport) -> WorkerReport | None:
        """Store ``report``; return the previous one."""
        with self._lock:
            before, self._report = self._report, report
            return before

    @property
    def exit_code(self) -> int:
        with self._lock:
            return self._exit_code

    def exit_with(self, code: int) -> None:
        """The code the process exits with once Celery stops (75: restart me)."""
        with self._lock:
            self._exit_code = code

    @property
    def last_heartbeat(self) -> float:
        with self._lock:
            return self._last_heartbeat

    def heartbeat_sent(self, at: float) -> None:
        with self._lock:
            self._last_heartbeat = at

    @property
    def alive_at(self) -> float:
        """When the heartbeat thread last went round its loop (liveness: a Redis outage is not a reason to
        restart a GPU worker; a wedged process is)."""
        with self._lock:
            return self._alive_at

    def still_alive(self, at: float) -> None:
        with self._lock:
            self._alive_at = at

    @property
    def progress_at(self) -> float:
        with self._lock:
            return self._progress_at

    def progressed(self, at: float) -> None:
        """A denoising step happened at monotonic time ``at`` (the engine-stall watchdog reads it)."""
        with self._lock:
            self._progress_at = at

    def watch_engine(self, busy_since: Callable[[], float | None]) -> None:
        """Where the engine tells when its current call began (None: idle)."""
        with self._lock:
            self._engine_busy = busy_since

    def engine_busy_since(self) -> float | None:
        with self._lock:
            busy = self._engine_busy
        return busy() if busy is not None else None

    def watch_loads(self, loading_since: Callable[[], float | None]) -> None:
        """Where the loads beside the engine tell when the load running now began (None: none)."""
        with self._lock:
            self._loading_since = loading_since

    def loading_since(self) -> float | None:
        with self._lock:
            since = self._loading_since
        return since() if since is not None else None


@dataclass(frozen=True)
class WorkerContext:
    """The worker's long-lived collaborators (settings, clients, device, resident models, safety checker),
    fixed at start-up, plus :class:`WorkerState`, the one place for what changes while it runs."""

    settings: WorkerSettings
    name: str
    device: DeviceInfo
    redis: redis.Redis
    jobs: JobStore
    store: ObjectStore
    files: FileCache
    models: PipelineCache
    screening: Screening
    queues: QueueSubscriptions = field(default_factory=QueueSubscriptions)
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)
    state: WorkerState = field(default_factory=WorkerState)
    simulation: Simulation | None = None  # ``--simulate``: pipelines that only sleep (see :mod:`.simulate`)

    def __post_init__(self) -> None:
        self.models.on_load = self.queues.loading_model  # a loading worker takes no other model's work
        self.models.on_load_beside = self._loading_beside  # ... but the resident models' hot work

    @contextlib.contextmanager
    def _loading_beside(self, model: str) -> Iterator[None]:
        with self.queues.loading_beside(model):
            self.state.wake.set()  # announce the load now (loading_model, assist_loading: helper places count it)
            yield

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

    def refresh_report(self) -> WorkerReport:
        """Recompute what the worker reports (on the job thread: the heartbeat thread never touches models)."""
        models = self.models
        entries = models.entries()
        report = WorkerReport(
            name=self.name, pid=os.getpid(), host=socket.gethostname(), device=self.device.device,
            device_name=self.device.name, dtype=self.device.dtype, tuning=models.tuning.describe(),
            total_memory=self.device.total_memory, models=models.registry.ids, resident_models=list(entries),
            resident_bytes=models.resident_bytes(), memory_budget=models.budget_bytes,
            resident_adapters={m: e.adapters.resident for m, e in entries.items()},
            cache=CacheCounts(hits=models.hits, misses=models.misses, evictions=models.evictions),
            model_times={m: ModelTimes(load_seconds=round(e.load_seconds, 3), image_seconds=e.image_seconds)
                         for m, e in entries.items()},
            adapter_switches=sum(e.adapters.switches for e in entries.values()),
            jobs_done=self.state.jobs_done, started_at=self.state.started_at,
        )
        self.state.set_report(report)
        return report

    def after_job(self) -> None:
        """Refresh the report; when the resident models changed (routing depends on them), follow them with
        the queue subscriptions and wake the heartbeat to announce it now."""
        before = self.state.report
        report = self.refresh_report()
        if before is not None and before.resident_models == report.resident_models:
            return
        self.queues.sync(self.models.resident)
        self.state.wake.set()

    def describe(self) -> WorkerReport:
        """The latest report plus live device memory, the jobs running now and the time (safe from any thread)."""
        report = self.state.report or WorkerReport(name=self.name)
        return report.model_copy(update={"free_memory": self.device.free_memory(), "heartbeat_at": time.time(),
                                         "current_jobs": self.state.current_jobs(),
                                         "jobs_done": self.state.jobs_done,
                                         "loading_model": loads.loading if (loads := self.state.loads) is not None else None,
                                         "assist_loading": self.queues.warming_model()})


class Heartbeat:
    """Announces the worker in Redis (``darkroom:worker:{name}``, short TTL) and runs the engine-stall watchdog
    from a daemon thread; the recovery sweeps (:class:`~.recovery.Rescue`) run at the same cadence from a
    second one, so a long sweep (a large backlog to look through) never lets the announcement expire.

    It only does I/O; it never touches a pipeline.
    """

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="darkroom-heartbeat", daemon=True)
        self._rescuer = threading.Thread(target=self._rescue, name="darkroom-rescue", daemon=True)
        self.rescue = Rescue.for_worker(ctx)

    def start(self) -> None:
        registry = self.ctx.models.registry
        Fleet(self.ctx.redis).register_models(registry.ids, registry.families())
        self.beat()
        self._thread.start()
        self._rescuer.start()

    def engine_stalled(self, now: float | None = None) -> float | None:
        """Seconds the engine has been in one call with no denoising step, or a model load beside it has run, when
        past ``engine_stall_seconds`` (a load that never ends would keep its jobs waiting for good)."""
        now = time.monotonic() if now is None else now
        limit = self.ctx.settings.engine_stall_seconds
        loading_since = self.ctx.state.loading_since()
        if loading_since is not None and now - loading_since > limit:
            return now - loading_since
        busy_since = self.ctx.state.engine_busy_since()
        if busy_since is None:
            return None
        idle = now - max(busy_since, self.ctx.state.progress_at)
        return idle if idle > limit else None

    def stop(self) -> None:
        self._stop.set()
        self.ctx.state.wake.set()
        with contextlib.suppress(redis.RedisError):
            Fleet(self.ctx.redis).withdraw(self.ctx.name)

    def beat(self) -> None:
        ttl = max(3, int(self.ctx.settings.heartbeat_seconds * 3))
        Fleet(self.ctx.redis).announce(self.ctx.describe(), ttl)
        self.ctx.state.heartbeat_sent(time.time())

    def _run(self) -> None:
        wake = self.ctx.state.wake
        while not self._stop.is_set():
            wake.wait(self.ctx.settings.heartbeat_seconds)
            wake.clear()
            if self._stop.is_set():
                return
            self.ctx.state.still_alive(time.time())
            stalled = self.engine_stalled()
            if stalled is not None:  # a pipeline call that never returns cannot be interrupted: recycle
                log.critical("the engine made no denoising step (or a model load did not end) for %.0f s "
                             "(engine_stall_seconds); recycling this "
                             "worker (exit 75); its jobs are taken over once their leases expire", stalled)
                logging.shutdown()
                os._exit(75)
            try:
                self.beat()
            except Exception as exc:  # noqa: BLE001 - the heartbeat must outlive Redis blips
                log.warning("heartbeat failed: %s", exc)

    def _rescue(self) -> None:
        while not self._stop.wait(self.ctx.settings.heartbeat_seconds):
            try:
                self.ctx.metrics.reconciled.inc(len(self.rescue.run_once().reconciled))
            except Exception as exc:  # noqa: BLE001 - the sweeps must outlive Redis blips
                log.warning("recovery sweep failed: %s", exc)
