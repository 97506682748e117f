"""How the SDK cancels: directly through the lifecycle (one producer, nothing signed), or, for a signed job,
as a signed request that a worker verifies and obeys only for the job's own producer
(:mod:`darkroom.common.cancels`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from darkroom.common.cancels import CANCELS_KEY, CancelAnswer, reply_key, sign_cancel
from darkroom.common.errors import ErrorCode, NotPermitted, WaitTimeout
from darkroom.common.jobstore import JobNotFound, JobRecord, JobStore
from darkroom.common.lifecycle import Lifecycle
from darkroom.common.settings import Settings

from ._submission import check_owner, owner, signer

if TYPE_CHECKING:
    import redis

__all__ = ["CANCEL_TIMEOUT_SECONDS", "cancel"]

CANCEL_TIMEOUT_SECONDS = 10.0
"""How long a signed cancel waits for a worker's answer (below the Redis read timeout)."""


def cancel(client: redis.Redis, settings: Settings, job_id: str, timeout: float = CANCEL_TIMEOUT_SECONDS,
           reason: str = "cancelled on request") -> JobRecord:
    """Cancel ``job_id`` as ``settings``' producer; returns the record after. NotPermitted (``not_permitted``,
    ``unauthenticated``) when it is not this producer's to cancel; WaitTimeout when no worker answered."""
    jobs = JobStore(client, ttl_seconds=settings.status_ttl_seconds)
    record = jobs.require(job_id)
    check_owner(record, settings, "cancel")
    sign = signer(settings)
    if sign is None:
        if record.auth is not None and not record.status.is_terminal:
            raise NotPermitted(ErrorCode.UNAUTHENTICATED, f"job {job_id} was submitted signed by producer "
                               f"{owner(record)!r}; workers obey only a cancel signed by it (set DARKROOM_PRODUCER_ID, "
                               "DARKROOM_PRODUCER_KEY_ID and DARKROOM_PRODUCER_KEY)")
        return Lifecycle(client, ttl_seconds=settings.status_ttl_seconds).cancel_job(job_id, reason)
    if record.status.is_terminal:
        return record
    request = sign_cancel(sign, job_id, record.submission)
    client.rpush(CANCELS_KEY, request.model_dump_json())
    popped = client.blpop([reply_key(job_id, request.request_id)], timeout=max(1, int(timeout)))
    if popped is None:
        raise WaitTimeout(job_id, None, f"no worker answered the cancel within {timeout:.0f} s; it stays queued "
                                        "and the first worker that serves requests applies it")
    answer = CancelAnswer.loads(popped[1])
    if answer.code is not None:
        raise NotPermitted(answer.code, f"the cancel of job {job_id} was refused: {answer.message}")
    if answer.status is None:
        raise JobNotFound(job_id)
    return jobs.require(job_id)
