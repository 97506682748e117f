"""The Celery application of a worker process and its one task.

Built by :func:`create_app` from a started :class:`WorkerContext`; nothing
happens at import. JSON is the only accepted serialization; messages are
acknowledged late, only once the job reached a decision (see :mod:`.delivery`).
A message is never dropped silently: an unexpected error requeues it (and a message of a
worker that died unacknowledged comes back, see :mod:`.recovery`), counted in the job's
record; past ``max_unexpected_failures`` the job goes to the dead-letter store, and a
message that names no job goes there at once: nothing loops.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

from celery import Celery, signals
from celery.exceptions import Reject, Retry

from darkroom.common.queues import TASK_IMG2IMG, celery_config

from .context import WorkerContext
from .delivery import DeliveryHandler, MessageAction
from .runner import JobRunner

__all__ = ["create_app"]

log = logging.getLogger(__name__)


def create_app(ctx: WorkerContext) -> Celery:
    app = Celery(f"darkroom-worker-{ctx.name}", set_as_current=False)
    app.conf.update(celery_config(ctx.settings))
    handler = DeliveryHandler(ctx, JobRunner(ctx))

    @signals.worker_ready.connect(weak=False)  # type: ignore[untyped-decorator]  # Celery is untyped
    def _attach_consumer(sender: Any, **_: Any) -> None:
        if getattr(sender, "app", None) is app:
            ctx.queues.attach(sender)

    # max_retries=None: the delivery handler bounds transient retries and deferrals itself
    @app.task(name=TASK_IMG2IMG, bind=True, acks_late=True, reject_on_worker_lost=True,  # type: ignore[untyped-decorator]
              max_retries=None)
    def img2img(task: Any, payload: Any = None, *args: Any, **kwargs: Any) -> None:
        if args or kwargs:  # not the documented shape (one JSON object, the job): keep it visible
            payload = {"args": [payload, *args], "kwargs": kwargs}
        try:
            decision = handler.handle(payload)
        except Exception as exc:  # noqa: BLE001 - e.g. Redis vanished mid-job: never drop the message
            log.exception("job %s: unexpected error outside the job", _job_id(payload))
            if _give_up(handler, payload, exc):
                return  # dead-lettered: acknowledged, never redelivered
            raise Reject(f"requeued after: {exc}", requeue=True) from exc
        if decision.action is MessageAction.RECYCLE:
            os.kill(os.getpid(), signal.SIGTERM)  # warm shutdown once this task returns
            ctx.state.exit_with(75)  # EX_TEMPFAIL: restart me
        if decision.countdown:
            _republish(task, decision.countdown)

    return app


def _republish(task: Any, countdown: float) -> None:
    """Retry after ``countdown``; if even that cannot be published, leave the message to be requeued."""
    try:
        task.retry(countdown=countdown)  # publishes the retry, then raises Retry (the message is acked)
    except Retry:
        raise
    except Exception as exc:  # noqa: BLE001 - the broker is unreachable right now
        raise Reject(f"could not schedule the retry: {exc}", requeue=True) from exc


def _give_up(handler: DeliveryHandler, payload: Any, exc: BaseException) -> bool:
    """Whether a delivery that broke should end in the dead-letter store instead of being requeued."""
    try:
        return handler.unexpected(payload, exc)
    except Exception as again:  # noqa: BLE001 - Redis itself is gone: requeue, the count waits for it
        log.warning("could not count the failed delivery (%s); requeueing", again)
        return False


def _job_id(payload: Any) -> str:
    return str(payload.get("job_id")) if isinstance(payload, dict) else "?"
