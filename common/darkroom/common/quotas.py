"""A producer's quotas: jobs in flight and submissions per minute, taken atomically at submit.

One script per submit call checks and takes both for all its jobs at once, so every client of one
producer shares them::

    darkroom:quota:{producer}:open             sorted set of the producer's open job ids (by submit time); ended
                                               or expired jobs are dropped when the count matters
    darkroom:quota:{producer}:minute:{minute}  submissions in that minute (expires after two)

A refusal is :class:`~darkroom.common.errors.NotPermitted` with code ``quota_exceeded`` and
``retry_after`` seconds (the next minute; for jobs in flight, a guess: when one of them ends).
Enforced by the SDK at submit; workers do not count (see docs/security.md).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from .errors import ErrorCode, NotPermitted
from .producers import ProducerPolicy

__all__ = ["IN_FLIGHT_RETRY_SECONDS", "quota_call", "quota_refusal"]

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
