"""Keeping a job's lease while it runs; a lease is lost by a refusal or by the clock.

Celery on Redis delivers at least once, so the lease decides who runs a job::

    darkroom:lease:{job_id} = "{submission}-{attempt}@{worker}"   PX <lease>, renewed every lease/3

It is taken in the same script that starts the attempt and increments its fencing token
(:meth:`darkroom.common.lifecycle.Lifecycle.start`). While a job waits out a retry backoff the key
holds ``retry:{submission}-{attempt}``, which any delivery may take.

The keeper renews it from a daemon thread (compare-and-set: only the holder can extend it). The
lease counts as lost when a renewal is refused, and also when no renewal succeeded for a whole lease
lifetime (Redis unreachable or stalled, or this process paused): by then another worker may have
taken the job over. The fence, not this flag, is what keeps a lost attempt from writing: the flag
only makes it stop early.
"""

from __future__ import annotations

import logging
import threading
import time
from types import TracebackType

import redis

from darkroom.common.lifecycle import Fence, Lifecycle, lease_key

__all__ = ["LeaseKeeper", "lease_key"]

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Renews one attempt's lease while it runs; :attr:`lost` tells whether it may have slipped away."""

    def __init__(self, lifecycle: Lifecycle, job_id: str, fence: Fence, worker: str, lease_seconds: float) -> None:
        self.lifecycle = lifecycle
        self.job_id = job_id
        self.value = f"{fence.tag}@{worker}"
        self.seconds = lease_seconds
        self._refused = False
        self._renewed = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="darkroom-lease", daemon=True)

    @property
    def lost(self) -> bool:
        """True once a renewal was refused, or no renewal succeeded for a whole lease lifetime."""
        return self._refused or time.monotonic() - self._renewed > self.seconds

    def __enter__(self) -> LeaseKeeper:
        self._renewed = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        interval = self.seconds / 3
        while not self._stop.wait(interval):
            if self._refused:
                return
            try:
                if self.lifecycle.renew(self.job_id, self.value, self.seconds):
                    self._renewed = time.monotonic()
                else:
                    self._refused = True
                    log.warning("lost the lease of job %s (another worker may have taken it over)", self.job_id)
                    return
            except redis.RedisError as exc:  # keep trying; past a lease lifetime `lost` turns true by itself
                log.warning("lease renewal of job %s failed: %s", self.job_id, exc)
