"""One delivery of a job message: lease, run, and what to do when it cannot finish now.

Outcomes of a delivery (the Celery task maps them onto ack / retry):

- **run**: the lease was free; the job ran to a terminal state (succeeded, failed, cancelled).
- **skip**: the job already ended (a duplicate of a finished job); nothing runs.
- **defer**: another live worker holds the lease (the broker redelivered a job still running);
  the message comes back after a lease lifetime, so it is never lost and never run twice.
- **retry**: a transient error; the job goes back to ``queued`` and is retried with exponential
  backoff (1 s doubling to 60 s, equal jitter), at most ``transient_retries`` times.
- **recycle**: a worker-fatal error (CUDA out of memory, corrupt state); the job is requeued once
  with a note (failed ``worker_fatal`` the second time) and the process shuts down warm to be
  restarted clean.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from darkroom.common.errors import ErrorCode, TransientError, WorkerFatalError
from darkroom.common.logs import job_context

from .context import WorkerContext
from .lease import Lease, LeaseKeeper
from .runner import JobRunner

__all__ = ["Outcome", "Decision", "DeliveryHandler", "backoff"]

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    RUN = "run"
    SKIP = "skip"
    DEFER = "defer"
    RETRY = "retry"
    RECYCLE = "recycle"


@dataclass(frozen=True)
class Decision:
    """What the broker side must do with the message: ack, or republish after ``countdown`` seconds."""

    outcome: Outcome
    countdown: float = 0.0


def backoff(retry: int, *, base: float = 1.0, cap: float = 60.0) -> float:
    """Exponential backoff with equal jitter: half of min(cap, base * 2**retry) plus up to as much again."""
    ceiling = min(cap, base * 2**retry)
    return ceiling / 2 + random.uniform(0.0, ceiling / 2)


class DeliveryHandler:
    """Decides and runs one delivery; the Celery task only translates the :class:`Decision`."""

    def __init__(self, ctx: WorkerContext, runner: JobRunner) -> None:
        self.ctx = ctx
        self.runner = runner

    def handle(self, payload: dict[str, Any]) -> Decision:
        job_id = payload.get("job_id") if isinstance(payload, dict) else None
        with job_context(job_id if isinstance(job_id, str) else None):
            return self._handle(payload, job_id)

    def _handle(self, payload: dict[str, Any], job_id: Any) -> Decision:
        if not isinstance(job_id, str):
            self.runner.run(payload)  # refused and logged by the runner's validation
            return Decision(Outcome.SKIP)
        record = self.ctx.jobs.get(job_id)
        if record is not None and record.status.is_terminal:
            return Decision(Outcome.SKIP)
        lease = Lease(self.ctx.redis, job_id, self.ctx.name, self.ctx.settings.lease_seconds)
        decision = self._lease_and_run(payload, job_id, lease, record)
        self.ctx.metrics.deliveries.labels(outcome=decision.outcome.value).inc()
        return decision

    def _lease_and_run(self, payload: dict[str, Any], job_id: str, lease: Lease, record: Any) -> Decision:
        if not lease.acquire():
            last = self.ctx.jobs.last_note(job_id)
            if last is None or last.get("event") != "deferred":  # one note per run of deferrals
                self.ctx.jobs.note(job_id, "deferred", worker=self.ctx.name, holder=lease.holder())
            log.info("job %s is running elsewhere (%s); deferring this delivery", job_id, lease.holder())
            return Decision(Outcome.DEFER, self.ctx.settings.lease_seconds * random.uniform(1.0, 2.0))
        if record is not None and record.status.value == "started":
            self.ctx.metrics.lease_takeovers.inc()  # its last worker died (or lost its lease) mid-job
        return self._run_leased(payload, job_id, lease)

    def _run_leased(self, payload: dict[str, Any], job_id: str, lease: Lease) -> Decision:
        try:
            with LeaseKeeper(lease) as keeper:
                self.runner.lease_lost = lambda: keeper.lost
                self.ctx.metrics.in_progress.inc()
                try:
                    self.ctx.metrics.observe_job(self.runner.run(payload))
                finally:
                    self.ctx.metrics.in_progress.dec()
        except TransientError as exc:
            return self._retry(payload, job_id, lease, exc)
        except WorkerFatalError as exc:
            lease.release()
            return self._recycle(payload, job_id, exc)
        finally:
            self.runner.lease_lost = lambda: False
        self.ctx.jobs.note(job_id, "finished", worker=self.ctx.name)
        lease.release()
        return Decision(Outcome.RUN)

    def _retry(self, payload: dict[str, Any], job_id: str, lease: Lease, exc: Exception) -> Decision:
        done = sum(1 for e in self.ctx.jobs.history(job_id) if e.get("event") == "transient")
        if done >= self.ctx.settings.transient_retries:
            lease.release()
            self._fail(payload, ErrorCode.TRANSIENT_EXHAUSTED, f"gave up after {done} retries: {exc}")
            return Decision(Outcome.RUN)
        delay = backoff(done)
        self.ctx.jobs.note(job_id, "transient", worker=self.ctx.name, error=str(exc), retry_in=round(delay, 2))
        self.runner.requeue(payload, f"retrying in {delay:.1f} s after a transient error: {exc}")
        lease.reserve_for_retry(delay)  # nobody reclaims the job while it waits out its backoff
        log.warning("job %s: transient error (%s); retry %d in %.1f s", job_id, exc, done + 1, delay)
        return Decision(Outcome.RETRY, delay)

    def _recycle(self, payload: dict[str, Any], job_id: str, exc: Exception) -> Decision:
        fatal_before = any(e.get("event") == "worker_fatal" for e in self.ctx.jobs.history(job_id))
        self.ctx.jobs.note(job_id, "worker_fatal", worker=self.ctx.name, error=str(exc))
        log.error("worker-fatal error in job %s (%s): recycling this process", job_id, exc)
        if fatal_before:
            self._fail(payload, ErrorCode.WORKER_FATAL,
                       f"{exc} (twice, on two worker processes; the job is likely too large for the device)")
            return Decision(Outcome.RECYCLE)
        self.runner.requeue(payload, f"requeued once after a worker-fatal error: {exc}")
        return Decision(Outcome.RECYCLE, 1.0)

    def _fail(self, payload: dict[str, Any], code: ErrorCode, message: str) -> None:
        job = self.runner._parse(payload, record_failure=False)
        if job is not None:
            self.runner.fail(job, code, message)
