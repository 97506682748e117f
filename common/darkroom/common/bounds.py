"""Bounded stores: the Lua that adds an entry to a hash kept with a time index, trimmed by age and count.

Used by every dead-letter store (jobs and unreadable messages in :mod:`.lifecycle`, webhooks in the
dispatcher), so that nothing appended to grows without bound.
"""

from __future__ import annotations

__all__ = ["keep_bounded"]


def keep_bounded(store: str, index: str, field: str, value: str, retention: str, cap: str) -> str:
    """Lua (inside a script) that sets ``store[field] = value``, indexes ``field`` by Redis's clock in ``index``,
    then drops entries older than ``retention`` seconds and the oldest beyond ``cap`` entries.

    Each argument is a Lua expression (e.g. ``"KEYS[6]"``, ``"ARGV[11]"``).
    """
    return f"""
do
  local now = redis.call('TIME')
  local t = now[1] + now[2] / 1000000
  redis.call('HSET', {store}, {field}, {value})
  redis.call('ZADD', {index}, t, {field})
  local old = redis.call('ZRANGEBYSCORE', {index}, '-inf', t - tonumber({retention}))
  local over = redis.call('ZCARD', {index}) - #old - tonumber({cap})
  if over > 0 then
    for _, f in ipairs(redis.call('ZRANGE', {index}, #old, #old + over - 1)) do table.insert(old, f) end
  end
  for _, f in ipairs(old) do redis.call('HDEL', {store}, f); redis.call('ZREM', {index}, f) end
end
"""
