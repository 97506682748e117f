"""Submissions that survive a Redis failover: WAIT for replicas, and clear retryable errors while Redis is away.

Redis replicates asynchronously: a primary acknowledges a write before any replica has it, and a failover in
that moment loses the write. A submission therefore ends its pipeline with ``WAIT n timeout`` (on the same
connection, so it covers exactly this pipeline's writes) when ``Settings.wait_replicas`` is above 0, and is
acknowledged only when ``n`` replicas confirmed it; fewer raise :class:`NotReplicated`.

While Redis is unreachable, read-only (a demoted primary) or has no primary (Sentinels electing one), the
SDK raises :class:`RedisUnavailable` (retryable) instead of redis-py's exceptions. Submitting the same jobs
again is safe: :func:`already_submitted` accepts a job whose record already holds the same content.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import redis
import redis.sentinel

from darkroom.common.errors import NotReplicated, RedisUnavailable
from darkroom.common.jobs import Img2ImgJob
from darkroom.common.jobstore import JobRecord, Outage
from darkroom.common.status import JobStatus

__all__ = ["REDIS_DOWN", "add_wait", "already_submitted", "reconnect_or_raise", "redis_unavailable",
           "require_replicas", "split_wait", "unavailable"]

REDIS_DOWN: tuple[type[Exception], ...] = (
    redis.ConnectionError,  # refused, reset, MasterNotFoundError, a demoted primary (Sentinel-managed clients)
    redis.TimeoutError,
    redis.exceptions.ReadOnlyError,  # a demoted primary, on a client that does not know Sentinel
    redis.exceptions.TryAgainError,
)
"""What redis-py raises while Redis is away or failing over."""
_WRONG_CREDENTIALS = (redis.exceptions.AuthenticationError, redis.exceptions.AuthenticationWrongNumberOfArgsError)


def add_wait(pipe: Any, replicas: int, timeout_ms: int) -> None:
    """End ``pipe`` with ``WAIT replicas timeout_ms`` (nothing when ``replicas`` is 0)."""
    if replicas > 0:
        pipe.execute_command("WAIT", replicas, timeout_ms)


def split_wait(replies: Sequence[Any], replicas: int) -> tuple[list[Any], int | None]:
    """The pipeline's replies without WAIT's, and WAIT's (replicas that confirmed; None without WAIT)."""
    if replicas <= 0:
        return list(replies), None
    return list(replies[:-1]), int(replies[-1])


def require_replicas(confirmed: int | None, wanted: int, timeout_ms: int, jobs: Sequence[Img2ImgJob]) -> None:
    """Raise NotReplicated when fewer than ``wanted`` replicas confirmed the submission of ``jobs``."""
    if confirmed is None or confirmed >= wanted:
        return
    ids = [job.job_id or "" for job in jobs]
    raise NotReplicated(
        f"{len(ids)} job(s) reached the Redis primary but {confirmed} of the {wanted} replica(s) required "
        f"(redis_wait_replicas) confirmed them within {timeout_ms} ms: a failover now could lose them. Submit the "
        "same jobs again (exc.jobs, same job_id) once a replica is back; a job already recorded is not doubled",
        ids, list(jobs), wanted=wanted, confirmed=confirmed,
    )


@contextlib.contextmanager
def redis_unavailable(action: str, jobs: Sequence[Img2ImgJob] = ()) -> Iterator[None]:
    """Turn redis-py's connection errors inside the block into the SDK's retryable RedisUnavailable."""
    try:
        yield
    except _WRONG_CREDENTIALS:
        raise  # a wrong password is not a failover: retrying will not help
    except REDIS_DOWN as exc:
        raise unavailable(action, exc, jobs) from exc


def unavailable(action: str, exc: Exception, jobs: Sequence[Img2ImgJob] = ()) -> RedisUnavailable:
    """The SDK's retryable error for redis-py's ``exc`` while doing ``action``."""
    ids = [job.job_id or "" for job in jobs]
    again = " Submitting the same jobs again (exc.jobs, same job_id) is safe." if jobs else ""
    return RedisUnavailable(
        f"Redis is unavailable or failing over; could not {action} ({type(exc).__name__}: {exc}). Try again in "
        f"a few seconds.{again}", ids, list(jobs),
    )


def reconnect_or_raise(exc: Exception, outage: Outage, action: str) -> None:
    """Return when a subscriber that lost its connection (``exc``, one of REDIS_DOWN) should subscribe again;
    raise RedisUnavailable once the outage outlasts its window, and wrong credentials at once."""
    if isinstance(exc, _WRONG_CREDENTIALS):
        raise exc
    if not outage.lost():
        raise unavailable(action, exc) from exc


def already_submitted(record: JobRecord | None, job: Img2ImgJob) -> bool:
    """Whether ``record`` is this very job submitted before (same content, not ended failed or cancelled): a
    retried submission whose first try was recorded after all is accepted, not refused as a taken id."""
    if record is None or record.job is None or record.status in (JobStatus.FAILED, JobStatus.CANCELLED):
        return False
    return bool(record.job.model_dump(mode="json") == job.model_dump(mode="json"))
