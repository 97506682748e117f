"""Prometheus metrics and health endpoints of a worker process.

``GET /metrics``  Prometheus text format (per process: one worker per GPU, so no multiprocess mode)
``GET /healthz``  live: the heartbeat thread announced the worker recently (the process is turning)
``GET /readyz``   ready: the model registry is loaded, the device answered, the consumer is attached

Served from a daemon thread on ``DARKROOM_METRICS_HOST:DARKROOM_METRICS_PORT`` (127.0.0.1 by default;
0 disables). Job metrics are recorded on the job thread; gauges about models are read from the
worker's last report, so scraping never touches a pipeline.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from darkroom.common.fleet import WorkerReport
from darkroom.common.webhooks import STATS_KEY as WEBHOOK_STATS_KEY

from . import recompiles

if TYPE_CHECKING:
    from darkroom.common.jobstore import JobRecord

    from .context import WorkerContext

__all__ = ["WorkerMetrics", "serve_metrics"]

log = logging.getLogger(__name__)

STAGES = ("queue_wait", "download", "decode", "model_load", "adapters", "inference", "encode", "upload", "safety",
          "total")
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)


class WorkerMetrics:
    """The worker's own metrics, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Counter("darkroom_jobs", "Jobs that reached a terminal state on this worker",
                            ["status", "code"], registry=self.registry)
        self.stage_seconds = Histogram("darkroom_job_seconds", "Seconds per job stage (total: start to commit)",
                                       ["stage"], buckets=_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("darkroom_batch_size", "Images per pipeline call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.in_progress = Gauge("darkroom_jobs_in_progress", "Jobs running on this worker now",
                                 registry=self.registry)
        self.lease_takeovers = Counter("darkroom_lease_takeovers", "Jobs taken over from a dead worker",
                                       registry=self.registry)
        self.deliveries = Counter("darkroom_deliveries", "Deliveries by outcome (run, skip, defer, retry, recycle)",
                                  ["outcome"], registry=self.registry)
        self.leases_lost = Counter("darkroom_leases_lost", "Attempts that stopped because their fence went stale",
                                   registry=self.registry)
        self.reconciled = Counter("darkroom_reconciled", "Jobs enqueued again by the reconciler (message lost)",
                                  registry=self.registry)
        self.refused = Counter("darkroom_jobs_refused", "Jobs, messages and cancels refused (identity, producer "
                               "policy; quota_exceeded: deliveries held back for a quota), by code", ["code"], registry=self.registry)
        self.timeouts = Counter("darkroom_job_timeouts", "Jobs that ran past their run-time limit",
                                registry=self.registry)

    def observe_job(self, record: JobRecord | None) -> None:
        if record is None or not record.status.is_terminal:
            return
        self.jobs.labels(status=record.status.value, code=record.error_code or "").inc()
        timings = record.result.timings if record.result is not None else None
        if timings is not None:
            for stage in STAGES:
                value = getattr(timings, stage, None)
                if value:
                    self.stage_seconds.labels(stage=stage).observe(float(value))
            self.batch_size.observe(len(record.result.outputs) if record.result else 0)

    def watch(self, ctx: WorkerContext) -> None:
        """Export the worker's report (models, cache, adapters, memory) at scrape time."""
        self.registry.register(_ReportCollector(ctx))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ReportCollector(Collector):
    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx

    def collect(self) -> Iterator[Any]:
        report = self.ctx.state.report or WorkerReport(name=self.ctx.name)
        events = CounterMetricFamily("darkroom_model_cache_events", "Model cache hits, misses and evictions",
                                     labels=["event"])
        for event, count in (("hit", report.cache.hits), ("miss", report.cache.misses),
                             ("eviction", report.cache.evictions)):
            events.add_metric([event], float(count))
        yield events
        yield GaugeMetricFamily("darkroom_resident_bytes", "Bytes of resident model weights",
                                value=float(report.resident_bytes))
        yield GaugeMetricFamily("darkroom_memory_budget_bytes", "Model memory budget",
                                value=float(report.memory_budget))
        yield CounterMetricFamily("darkroom_adapter_switches", "LoRA adapter activations",
                                  value=float(report.adapter_switches))
        yield CounterMetricFamily("darkroom_recompiles", "torch.compile recompiles of a compiled denoiser after its "
                                  "first compile (each logged with the guard that failed)", value=float(recompiles.total()))
        resident = GaugeMetricFamily("darkroom_model_resident", "1 when the model is resident", labels=["model"])
        for model in report.models:
            resident.add_metric([model], 1.0 if model in report.resident_models else 0.0)
        yield resident
        yield self._webhooks()
        yield self._queues(report.models)
        memory = GaugeMetricFamily("darkroom_device_memory_bytes", "Device memory", labels=["kind"])
        free, total = self.ctx.device.free_memory(), self.ctx.device.total_memory
        if free is not None:
            memory.add_metric(["free"], float(free))
        if total:
            memory.add_metric(["total"], float(total))
        yield memory


    def _queues(self, models: list[str]) -> GaugeMetricFamily:
        """Queued jobs per queue of the models this worker serves (all priorities summed)."""
        from darkroom.common.queues import PRIORITY_STEPS, cold_queue, hot_queue, priority_keys

        family = GaugeMetricFamily("darkroom_queue_depth", "Jobs waiting in a queue", labels=["queue"])
        try:
            pipe = self.ctx.redis.pipeline(transaction=False)
            queues = [q for m in models for q in (hot_queue(m), cold_queue(m))]
            for key in (key for queue in queues for key in priority_keys(queue)):
                pipe.llen(key)
            lengths = pipe.execute()
        except Exception:  # noqa: BLE001 - a scrape must not fail because Redis blinked
            return family
        step = len(PRIORITY_STEPS)
        for i, queue in enumerate(queues):
            family.add_metric([queue], float(sum(lengths[i * step:(i + 1) * step])))
        return family

    def _webhooks(self) -> CounterMetricFamily:
        """Fleet-wide webhook outcomes kept by the dispatchers in Redis (the same on every worker: use max())."""
        family = CounterMetricFamily("darkroom_webhook_deliveries", "Webhook delivery outcomes, fleet-wide",
                                     labels=["outcome"])
        try:
            raw = self.ctx.redis.hgetall(WEBHOOK_STATS_KEY)
        except Exception:  # noqa: BLE001 - a scrape must not fail because Redis blinked
            raw = {}
        for outcome, count in sorted(raw.items()):
            name = outcome.decode() if isinstance(outcome, bytes) else str(outcome)
            family.add_metric([name], float(count))
        return family


def serve_metrics(ctx: WorkerContext, metrics: WorkerMetrics, host: str, port: int) -> ThreadingHTTPServer | None:
    """Start the metrics/health HTTP server in a daemon thread; return it, or None if the port is taken
    (a warning: the worker still works, only unobserved)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/metrics":
                self._send(200, metrics.render(), "text/plain; version=0.0.4")
            elif self.path == "/healthz":
                # the heartbeat thread goes round (Redis reachable or not): a Redis outage must not restart GPU pods
                ok = time.time() - ctx.state.alive_at < max(30.0, ctx.settings.heartbeat_seconds * 6)
                self._send(200 if ok else 503, b"live\n" if ok else b"heartbeat thread stalled\n", "text/plain")
            elif self.path == "/readyz":
                ok = ctx.state.report is not None and ctx.queues.consumer is not None
                self._send(200 if ok else 503, b"ready\n" if ok else b"not ready\n", "text/plain")
            else:
                self._send(404, b"not found\n", "text/plain")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            return

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        log.warning("metrics server not started on %s:%d (%s); set DARKROOM_METRICS_PORT to a free port", host,
                    port, exc)
        return None
    threading.Thread(target=server.serve_forever, name="darkroom-metrics", daemon=True).start()
    log.info("metrics and health on http://%s:%d/metrics", host, server.server_port)
    return server
