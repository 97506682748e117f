"""A producer's quotas: jobs in flight and submissions per minute, taken atomically at submit.

One script per submit call checks and takes both for all its jobs at once, so every client of one
producer shares them::

    darkroom:quota:{producer}:open             sorted set of the producer's open job ids (by submit time); ended
                                               or expired jobs are dropped when the count matters
    darkroom:quota:{producer}:minute:{minute}  submissions in that minute (expires after two)

A refusal is :class:`~darkroom.common.errors.NotPermitted` with code ``quota_exceeded`` and
``retry_after`` seconds (the next minute; for jobs in flight, a guess: when one of them ends).

That is the early check. Workers keep their own count (:class:`WorkerQuota`, keys only workers write)
and hold back, without failing it, a job that reached the queue past the SDK while its producer is
at a quota: see :class:`WorkerQuota` and docs/security.md.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ErrorCode, NotPermitted
from .producers import ProducerPolicy

__all__ = ["IN_FLIGHT_RETRY_SECONDS", "Deferral", "WorkerQuota", "quota_call", "quota_refusal"]

IN_FLIGHT_RETRY_SECONDS = 5.0
"""What a refusal for jobs in flight suggests waiting (a job may end any time)."""

# KEYS: open set, minute counter. ARGV: jobs now, most in flight (0: none), most per minute (0: none), now (s),
# then the job ids. Replies: 'ok', 'minute:<count so far>', 'open:<count in flight>'.
QUOTA_SCRIPT = """
local n, most_open, most_minute, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if most_minute > 0 then
  local used = tonumber(redis.call('GET', KEYS[2]) or '0')
  if used + n > most_minute then return 'minute:' .. used end
end
if most_open > 0 then
  local count = redis.call('ZCARD', KEYS[1])
  if count + n > most_open then
    for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
      local raw = redis.call('GET', 'darkroom:job:' .. id)
      local open = false
      if raw then
        local ok, rec = pcall(cjson.decode, raw)
        open = ok and type(rec) == 'table' and (rec['status'] == 'queued' or rec['status'] == 'started')
      end
      if not open then redis.call('ZREM', KEYS[1], id) end
    end
    count = redis.call('ZCARD', KEYS[1])
    if count + n > most_open then return 'open:' .. count end
  end
  for i = 5, #ARGV do redis.call('ZADD', KEYS[1], now, ARGV[i]) end
end
if most_minute > 0 then
  redis.call('INCRBY', KEYS[2], n)
  redis.call('EXPIRE', KEYS[2], 120)
end
return 'ok'
"""


def quota_call(producer: str, policy: ProducerPolicy, job_ids: Sequence[str],
               now: float | None = None) -> tuple[list[str], list[Any]] | None:
    """(keys, args) of the quota script for ``job_ids``, or None when the policy sets no quota."""
    if policy.max_in_flight is None and policy.max_per_minute is None:
        return None
    at = time.time() if now is None else now
    keys = [f"darkroom:quota:{producer}:open", f"darkroom:quota:{producer}:minute:{int(at // 60)}"]
    return keys, [len(job_ids), policy.max_in_flight or 0, policy.max_per_minute or 0, at, *job_ids]


def quota_refusal(reply: Any, producer: str, policy: ProducerPolicy, jobs: int,
                  now: float | None = None) -> NotPermitted | None:
    """The refusal a script reply means (None: the quota was taken)."""
    text = reply.decode() if isinstance(reply, bytes) else str(reply)
    kind, _, count = text.partition(":")
    if kind == "minute":
        at = time.time() if now is None else now
        wait = 60.0 - at % 60
        return NotPermitted(ErrorCode.QUOTA_EXCEEDED, f"producer {producer!r} submitted {count} job(s) this minute; "
                            f"{jobs} more would pass its {policy.max_per_minute} per minute; retry in {wait:.0f} s",
                            retry_after=wait)
    if kind == "open":
        return NotPermitted(ErrorCode.QUOTA_EXCEEDED, f"producer {producer!r} has {count} job(s) in flight; {jobs} "
                            f"more would pass its {policy.max_in_flight}; retry when some have ended",
                            retry_after=IN_FLIGHT_RETRY_SECONDS)
    return None


# -- the worker's count (authoritative) ---------------------------------------------------------
WORKER_IN_FLIGHT_KEY = "darkroom:admitted:{producer}"
"""Sorted set of the producer's jobs a worker admitted that have not ended (by admission time). Only workers
write it: a producer's Redis user cannot reach it, so it cannot make room for itself."""
WORKER_MINUTE_KEY = "darkroom:admitted:{producer}:minute:{minute}"
"""Jobs of the producer first admitted by a worker in that minute (expires after two)."""
PRUNE_AT = 1000
"""With no in-flight quota, ended jobs are dropped from the admitted set once it holds this many."""

# KEYS: admitted set, minute counter. ARGV: job id, most in flight (0: none), most per minute (0: none), now (s),
# prune threshold, TTL of the set. Replies: 'ok' (admitted now or before), 'open:<count>', 'minute:<count>'.
WORKER_QUOTA_SCRIPT = """
local id, most_open, most_minute, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if redis.call('ZSCORE', KEYS[1], id) then return 'ok' end
local count = redis.call('ZCARD', KEYS[1])
local limit = most_open > 0 and most_open or tonumber(ARGV[5])
if count >= limit then
  for _, other in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    local raw = redis.call('GET', 'darkroom:job:' .. other)
    local open = false
    if raw then
      local ok, rec = pcall(cjson.decode, raw)
      open = ok and type(rec) == 'table' and (rec['status'] == 'queued' or rec['status'] == 'started')
    end
    if not open then redis.call('ZREM', KEYS[1], other) end
  end
  count = redis.call('ZCARD', KEYS[1])
end
if most_open > 0 and count >= most_open then return 'open:' .. count end
if most_minute > 0 then
  local used = tonumber(redis.call('GET', KEYS[2]) or '0')
  if used >= most_minute then return 'minute:' .. used end
  redis.call('INCR', KEYS[2])
  redis.call('EXPIRE', KEYS[2], 120)
end
redis.call('ZADD', KEYS[1], now, id)
redis.call('EXPIRE', KEYS[1], ARGV[6])
return 'ok'
"""


@dataclass(frozen=True)
class Deferral:
    """A job a worker will not start yet: its producer is at a quota. ``retry_after``: seconds to wait."""

    message: str
    retry_after: float


class WorkerQuota:
    """The worker's own count of each producer's jobs, taken when a worker first admits a job.

    The SDK's count at submit tells a producer early; this one holds whatever reached the queue (a message
    or record written past the SDK included). A job past a quota is not failed: it is valid, only early. It
    waits (its delivery is deferred) until the producer's jobs in flight end or the next minute begins. A job
    admitted once (a retry, a takeover, a redelivery) is never counted again.
    """

    def __init__(self, client: Any, *, ttl_seconds: int = 7 * 24 * 3600,
                 clock: Callable[[], float] = time.time) -> None:
        self._script = client.register_script(WORKER_QUOTA_SCRIPT)
        self.ttl = ttl_seconds
        self.clock = clock

    def take(self, producer: str, policy: ProducerPolicy, job_id: str) -> Deferral | None:
        """Admit ``job_id`` under ``producer``'s quotas, or say how long it must wait."""
        if policy.max_in_flight is None and policy.max_per_minute is None:
            return None
        now = self.clock()
        keys = [WORKER_IN_FLIGHT_KEY.format(producer=producer),
                WORKER_MINUTE_KEY.format(producer=producer, minute=int(now // 60))]
        reply = self._script(keys=keys, args=[job_id, policy.max_in_flight or 0, policy.max_per_minute or 0, now,
                                              PRUNE_AT, self.ttl])
        kind, _, count = (reply.decode() if isinstance(reply, bytes) else str(reply)).partition(":")
        if kind == "open":
            return Deferral(f"producer {producer!r} has {count} job(s) running or admitted, its most in flight "
                            f"({policy.max_in_flight}); this job waits until one ends",
                            IN_FLIGHT_RETRY_SECONDS * random.uniform(1.0, 2.0))
        if kind == "minute":
            return Deferral(f"producer {producer!r} had {count} job(s) admitted this minute, its most per minute "
                            f"({policy.max_per_minute}); this job waits for the next minute",
                            60.0 - now % 60 + random.uniform(0.0, 5.0))
        return None
