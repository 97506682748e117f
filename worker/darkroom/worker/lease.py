"""Per-job leases: at most one worker runs a job at a time, and a dead worker's job is taken over.

Celery on Redis delivers at least once: a message unacknowledged past the
broker's visibility timeout is delivered again while its first run goes on,
and a killed worker's message comes back. The lease decides who runs::

    darkroom:lease:{job_id} = "<worker>:<token>"   SET NX PX <ttl>, renewed every ttl/3 while the job runs

A delivery that finds the lease held by someone else defers itself; one that
finds it expired (the holder died) takes the job over. While a job waits out a
retry backoff the key holds ``retry:<owner>``: the job is not abandoned, and
the retried delivery may take the lease. Renewal and release
only succeed for the holder (compare-and-set in Lua), so a slow zombie cannot
extend or drop a lease it lost.
"""

from __future__ import annotations

import logging
import threading
import uuid
from types import TracebackType

import redis

__all__ = ["Lease", "LeaseKeeper", "lease_key"]

log = logging.getLogger(__name__)

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
_ACQUIRE = """
local v = redis.call('get', KEYS[1])
if (not v) or string.sub(v, 1, 6) == 'retry:' then
  redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


def lease_key(job_id: str) -> str:
    return f"darkroom:lease:{job_id}"


class Lease:
    """One job's lease as seen by one worker."""

    def __init__(self, client: redis.Redis, job_id: str, worker: str, ttl_seconds: float) -> None:
        self.redis = client
        self.key = lease_key(job_id)
        self.owner = f"{worker}:{uuid.uuid4().hex[:8]}"
        self.ttl_ms = int(ttl_seconds * 1000)

    def acquire(self) -> bool:
        """Take the lease if it is free or only reserved for a retry."""
        return bool(self.redis.eval(_ACQUIRE, 1, self.key, self.owner, self.ttl_ms))

    def renew(self) -> bool:
        return bool(self.redis.eval(_RENEW, 1, self.key, self.owner, self.ttl_ms))

    def release(self) -> None:
        self.redis.eval(_RELEASE, 1, self.key, self.owner)

    def holder(self) -> str | None:
        raw = self.redis.get(self.key)
        return raw.decode() if isinstance(raw, bytes) else raw

    def held(self) -> bool:
        return self.holder() == self.owner

    def reserve_for_retry(self, seconds: float) -> None:
        """While a retry waits out its backoff: a marker that keeps the job from being reclaimed as abandoned
        but lets the retried delivery (or any other) take the lease at once."""
        self.redis.set(self.key, f"retry:{self.owner}", px=int(seconds * 1000) + self.ttl_ms)


class LeaseKeeper:
    """Renews a lease from a daemon thread while the job runs; ``lost`` tells if it slipped away."""

    def __init__(self, lease: Lease) -> None:
        self.lease = lease
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="darkroom-lease", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        interval = self.lease.ttl_ms / 3000
        while not self._stop.wait(interval):
            try:
                if not self.lease.renew():
                    self.lost = True
                    log.warning("lost the lease %s (another worker may have taken the job over)", self.lease.key)
                    return
            except redis.RedisError as exc:  # a Redis blip: keep trying until the lease would expire
                log.warning("lease renewal failed: %s", exc)
