"""The Celery application of a worker process and its one task.

Built by :func:`create_app` from a started :class:`WorkerContext`; nothing
happens at import. JSON is the only accepted serialization; messages are
acknowledged late and rejected (requeued) if the worker is lost mid-job.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from celery import Celery, signals

from darkroom.common.errors import ErrorCode, TransientError
from darkroom.common.queues import TASK_IMG2IMG, celery_config

from .context import WorkerContext
from .runner import JobRunner

__all__ = ["create_app", "retry_delay"]

log = logging.getLogger(__name__)


def retry_delay(retries: int, *, base: float = 1.0, cap: float = 60.0) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**retries)]."""
    return random.uniform(0.0, min(cap, base * 2**retries))


def create_app(ctx: WorkerContext) -> Celery:
    app = Celery(f"darkroom-worker-{ctx.name}", set_as_current=False)
    app.conf.update(celery_config(ctx.settings))
    runner = JobRunner(ctx)

    @signals.worker_ready.connect(weak=False)
    def _attach_consumer(sender: Any, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            ctx.queues.attach(sender)

    @app.task(name=TASK_IMG2IMG, bind=True, acks_late=True, reject_on_worker_lost=True)
    def img2img(task: Any, payload: dict[str, Any]) -> None:
        try:
            runner.run(payload)
        except TransientError as exc:
            retries = int(task.request.retries or 0)
            if retries >= ctx.settings.transient_retries:
                job = runner._parse(payload, record_failure=False)
                if job is not None:
                    runner.fail(job, ErrorCode.TRANSIENT_EXHAUSTED, f"gave up after {retries} retries: {exc}")
                return
            delay = retry_delay(retries)
            log.warning("job %s: transient error (%s); retry %d in %.1f s", payload.get("job_id"), exc,
                        retries + 1, delay)
            runner.requeue(payload, f"retrying after transient error: {exc}")
            raise task.retry(exc=exc, countdown=delay, max_retries=ctx.settings.transient_retries) from None

    return app
