"""One delivery of a job message: start an attempt, run it, and say what the broker should do.

Every state change goes through :class:`~darkroom.common.lifecycle.Lifecycle` (one fenced script
each); this module only maps what happened onto a :class:`Decision` for the Celery task:

- **run**: the attempt ran to an outcome the lifecycle recorded (succeeded, failed, cancelled).
- **skip**: nothing to run: the job already ended (a duplicate message), the message could not be
  read (it failed the job ``invalid_job``, or went to the dead-letter store), or this attempt lost its
  lease (another attempt holds the job now: this one stops, writes nothing and acknowledges).
- **defer**: another live attempt holds the lease; the message comes back after a lease lifetime.
- **retry**: a transient error; the job went back to ``queued`` and is retried with exponential
  backoff (1 s doubling to 60 s, equal jitter), at most ``transient_retries`` times (a counter in the
  record).
- **recycle**: a worker-fatal error (CUDA out of memory, corrupt state); the job was requeued once
  (failed ``worker_fatal`` the second time) and the process shuts down warm to be restarted clean.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from darkroom.common.errors import LeaseLost, TransientError, WorkerFatalError
from darkroom.common.jobs import Img2ImgJob
from darkroom.common.jobstore import JobRecord, UnreadableRecord
from darkroom.common.lifecycle import Fence, StartReply, message_job
from darkroom.common.logs import job_context

from . import chains
from .chains import upstream_of
from .context import WorkerContext
from .lease import LeaseKeeper
from .runner import JobRunner

__all__ = ["MessageAction", "Decision", "DeliveryHandler", "backoff"]

log = logging.getLogger(__name__)


class MessageAction(StrEnum):
    RUN = "run"
    SKIP = "skip"
    DEFER = "defer"
    RETRY = "retry"
    RECYCLE = "recycle"


@dataclass(frozen=True)
class Decision:
    """What the broker side must do with the message: ack, or republish after ``countdown`` seconds."""

    action: MessageAction
    countdown: float = 0.0


def backoff(retry: int, *, base: float = 1.0, cap: float = 60.0) -> float:
    """Exponential backoff with equal jitter: half of min(cap, base * 2**retry) plus up to as much again."""
    ceiling = min(cap, base * 2.0 ** min(retry, 32))
    return ceiling / 2 + random.uniform(0.0, ceiling / 2)


class DeliveryHandler:
    """Decides and runs one delivery; the Celery task only translates the :class:`Decision`."""

    def __init__(self, ctx: WorkerContext, runner: JobRunner) -> None:
        self.ctx = ctx
        self.runner = runner

    def handle(self, payload: Any) -> Decision:
        job_id = payload.get("job_id") if isinstance(payload, dict) else None
        with job_context(job_id if isinstance(job_id, str) else None):
            decision = self._handle(payload)
        self.ctx.metrics.deliveries.labels(outcome=decision.action.value).inc()
        return decision

    def unexpected(self, payload: Any, exc: BaseException) -> bool:
        """A delivery broke outside the job: count it; True when the job was dead-lettered (do not requeue)."""
        job_id, *_ = message_job(payload)
        if job_id is None:
            self.ctx.lifecycle.dead_letter_message(payload, f"the delivery broke: {type(exc).__name__}: {exc}")
            return True
        count = self.ctx.lifecycle.count_unexpected(job_id)
        if count < self.ctx.settings.max_unexpected_failures:
            return False
        record = self.ctx.lifecycle.read(job_id)
        if record is not None and not record.status.is_terminal:
            self.ctx.lifecycle.dead_letter(record, f"{count} deliveries broke outside the job; last: {exc}")
        return True

    def _handle(self, payload: Any) -> Decision:
        lifecycle = self.ctx.lifecycle
        admission = self.ctx.gate.admit(payload, lifecycle)  # who sent it, before any I/O on its behalf
        if admission.refused is not None:
            self.ctx.metrics.refused.labels(code=admission.refused.value).inc()
            if admission.retry_after is not None:  # a quota: the job is valid, only early; it waits
                lifecycle.note(str(payload.get("job_id")), "held_back", code=admission.refused.value,
                               reason=admission.reason, retry_in=round(admission.retry_after, 1))
                return Decision(MessageAction.DEFER, admission.retry_after)
            return Decision(MessageAction.SKIP)
        job_id, job, invalid, ignored = message_job(payload)
        if job_id is None:
            lifecycle.dead_letter_message(payload, invalid or "the message has no usable job_id")
            return Decision(MessageAction.SKIP)
        if ignored:
            log.warning("job %s: message of a newer schema; ignoring fields %s", job_id, ", ".join(ignored))
        if job is None and not self._has_record(job_id):
            assert invalid is not None
            log.warning("refusing invalid job %s: %s", job_id, invalid)
            lifecycle.reject_message(job_id, invalid, payload)
            return Decision(MessageAction.SKIP)
        if job is not None and job.upstream is not None and (waiting := self._chained(job_id, job, admission)):
            return waiting
        started = lifecycle.start(job_id, job, worker=self.ctx.name, lease_seconds=self.ctx.settings.lease_seconds,
                                  max_lost=self.ctx.settings.max_deliveries, producer=admission.producer_id,
                                  auth=admission.auth)
        if started.reply is StartReply.HELD:
            lifecycle.note(job_id, "deferred", worker=self.ctx.name, holder=started.holder)
            log.info("job %s is running elsewhere (%s); deferring this delivery", job_id, started.holder)
            return Decision(MessageAction.DEFER, self.ctx.settings.lease_seconds * random.uniform(1.0, 2.0))
        if started.reply is not StartReply.STARTED:
            return Decision(MessageAction.SKIP)
        assert started.record is not None and started.fence is not None
        if started.fence.attempt > 1 and started.record.lost_attempts > 0:
            self.ctx.metrics.lease_takeovers.inc()  # an earlier attempt's worker died or lost its lease
        return self._run(started.record, started.fence)

    def _chained(self, job_id: str, job: Img2ImgJob, admission: Any) -> Decision | None:
        """A chained job's delivery before it starts: None when its upstream succeeded (run it), else what to do."""
        lifecycle = self.ctx.lifecycle
        record = lifecycle.read(job_id)
        if record is None or record.status.is_terminal:
            return None  # start() answers it as for any job
        upstream = upstream_of(lifecycle, job, record.producer if record.producer is not None
                               else admission.producer_id)
        if upstream.ready:
            return None
        if upstream.waiting:
            if not any(entry.get("event") == "waiting_upstream" for entry in self.ctx.jobs.history(job_id)[-3:]):
                lifecycle.note(job_id, "waiting_upstream", reason=upstream.reason)
            return Decision(MessageAction.DEFER, chains.WAIT_SECONDS * random.uniform(1.0, 1.5))
        if upstream.cancelled:
            lifecycle.cancel(job_id, upstream.reason)
        else:
            assert upstream.code is not None
            lifecycle.refuse(record, upstream.code, upstream.reason)
        return Decision(MessageAction.SKIP)

    def _has_record(self, job_id: str) -> bool:
        try:
            return self.ctx.lifecycle.read(job_id) is not None
        except UnreadableRecord:
            return True  # start() puts it in the dead-letter store

    def _run(self, record: JobRecord, fence: Fence) -> Decision:
        settings = self.ctx.settings
        try:
            with LeaseKeeper(self.ctx.lifecycle, record.job_id, fence, self.ctx.name, settings.lease_seconds) as keeper:
                self.runner.lease_lost = lambda: keeper.lost
                self.ctx.metrics.in_progress.inc()
                try:
                    self.ctx.metrics.observe_job(self.runner.run(record, fence))
                finally:
                    self.ctx.metrics.in_progress.dec()
        except LeaseLost as exc:
            self.ctx.metrics.leases_lost.inc()
            log.warning("%s; this attempt stops and writes nothing", exc)
            return Decision(MessageAction.SKIP)
        except TransientError as exc:
            return self._retry(record, fence, exc)
        except WorkerFatalError as exc:
            return self._recycle(record, fence, exc)
        finally:
            self.runner.lease_lost = lambda: False
        return Decision(MessageAction.RUN)

    def _retry(self, record: JobRecord, fence: Fence, exc: Exception) -> Decision:
        settings = self.ctx.settings
        try:
            after, delay = self.ctx.lifecycle.retry(
                fence, self.ctx.lifecycle.read(record.job_id) or record, str(exc),
                max_retries=settings.transient_retries, lease_seconds=settings.lease_seconds,
                delay=lambda done: backoff(done, base=settings.retry_backoff_seconds,
                                           cap=settings.retry_backoff_cap_seconds))
        except LeaseLost as lost:
            log.warning("%s; not retrying", lost)
            return Decision(MessageAction.SKIP)
        if after.status.is_terminal:
            return Decision(MessageAction.RUN)
        log.warning("job %s: transient error (%s); retry %d in %.1f s", record.job_id, exc, after.transient_retries,
                    delay)
        return Decision(MessageAction.RETRY, delay)

    def _recycle(self, record: JobRecord, fence: Fence, exc: Exception) -> Decision:
        log.error("worker-fatal error in job %s (%s): recycling this process", record.job_id, exc)
        try:
            after = self.ctx.lifecycle.requeue_fatal(fence, self.ctx.lifecycle.read(record.job_id) or record, str(exc))
        except LeaseLost:
            return Decision(MessageAction.RECYCLE)
        return Decision(MessageAction.RECYCLE, 0.0 if after.status.is_terminal else 1.0)
