"""Fair share of a model's GPUs among producers' bulk work: per-producer queues released by weight.

With ``DARKROOM_FAIR_SHARE`` set where jobs are submitted, a *bulk* job (no explicit broker priority)
is not pushed onto its model's broker list. Its message waits in its producer's own list for the
model, and workers release messages from those lists onto the model's queue (hot when a worker holds
the model resident, else cold: model-affinity routing is decided at release) a few at a time, by
smooth weighted round robin over the producers that have work waiting (weights from the producer
registry, 1 by default). Two producers with work waiting for one model at equal weights therefore
alternate, whatever their volumes; a producer that stops waiting keeps no credit. Interactive jobs
never wait here: they go straight to priority 0, which workers take first.

Keys, per model (plain lists and a set; nothing expires, everything is bounded by the jobs queued)::

    darkroom.img2img.fair:{model}:{producer}   the producer's held messages (LPUSH new, RPOP oldest)
    darkroom:fair:{model}:producers      set of producers with held messages
    darkroom:fair:{model}:credit         hash producer -> credit (smooth weighted round robin)
    darkroom:fair:{model}:backlog        one token per held message: LLEN is the held backlog, which the
                                         autoscaler counts beside the broker lists (infra/k8s)

A job's record is written with the message held, in the same step (``jobstore.stage_create``), so a
held message never exists without its record, and the reconciler (which re-enqueues open jobs whose
message it finds nowhere) sees held messages as it sees queued ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import redis

from .queues import broker_list

__all__ = ["FAIR_PRIORITY", "backlog", "backlog_key", "credit_key", "feed", "held_queue", "hold", "producers_key"]

_HELD_PREFIX = "darkroom.img2img.fair:"  # ':' cannot occur in model or producer ids
FAIR_PRIORITY = 6
"""The broker priority released bulk messages go to (``Priority.BULK.broker_priority``)."""


def held_queue(model_id: str, producer: str) -> str:
    """Named like the broker's queues so that the reconciler, which looks for a job's message in every
    ``darkroom.img2img*`` list, finds held ones too (and does not enqueue them a second time)."""
    return f"{_HELD_PREFIX}{model_id}:{producer}"


def producers_key(model_id: str) -> str:
    return f"darkroom:fair:{model_id}:producers"


def credit_key(model_id: str) -> str:
    return f"darkroom:fair:{model_id}:credit"


def backlog_key(model_id: str) -> str:
    return f"darkroom:fair:{model_id}:backlog"


def hold(model_id: str, producer: str, message: str | bytes) -> list[str | bytes]:
    """(command, key, value) triples that hold ``message`` for release (for the create script)."""
    return ["LPUSH", held_queue(model_id, producer), message, "SADD", producers_key(model_id), producer,
            "LPUSH", backlog_key(model_id), "1"]


# KEYS: producers set, credit hash, backlog list, target broker list.
# ARGV: depth (release while the target list is shorter), held-queue key prefix, most to release this call,
#       then (producer, weight) pairs (producers not named weigh 1).
# Reply: messages released.
_FEED = """
local depth, prefix, most = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local weights = {}
for i = 4, #ARGV, 2 do weights[ARGV[i]] = tonumber(ARGV[i + 1]) end
local released = 0
while released < most and redis.call('LLEN', KEYS[4]) < depth do
  local active = redis.call('SMEMBERS', KEYS[1])
  if #active == 0 then break end
  table.sort(active)
  local total, best, best_credit = 0, nil, nil
  local credits = {}
  for _, p in ipairs(active) do
    local w = weights[p] or 1
    total = total + w
    credits[p] = tonumber(redis.call('HGET', KEYS[2], p) or '0') + w
    if best_credit == nil or credits[p] > best_credit then best, best_credit = p, credits[p] end
  end
  credits[best] = credits[best] - total
  local message = redis.call('RPOP', prefix .. best)
  if message then
    redis.call('LPUSH', KEYS[4], message)
    redis.call('RPOP', KEYS[3])
    released = released + 1
  end
  for _, p in ipairs(active) do redis.call('HSET', KEYS[2], p, tostring(credits[p])) end
  if redis.call('LLEN', prefix .. best) == 0 then
    redis.call('SREM', KEYS[1], best)
    redis.call('HDEL', KEYS[2], best)
  end
end
return released
"""


class Feeder:
    """Releases held bulk messages of some models onto their queues (one script call per model)."""

    def __init__(self, client: redis.Redis, *, depth: int = 2, most: int = 64) -> None:
        self.redis = client
        self.depth = depth
        self.most = most
        self._script = client.register_script(_FEED)

    def feed(self, model_id: str, queue: str, weights: Mapping[str, float] | None = None) -> int:
        """Release held messages of ``model_id`` onto ``queue``'s bulk list while it holds fewer than ``depth``."""
        pairs: list[Any] = []
        for producer, weight in (weights or {}).items():
            pairs += [producer, weight]
        keys = [producers_key(model_id), credit_key(model_id), backlog_key(model_id),
                broker_list(queue, FAIR_PRIORITY)]
        return int(self._script(keys=keys, args=[self.depth, f"{_HELD_PREFIX}{model_id}:", self.most, *pairs]))


def feed(client: redis.Redis, model_id: str, queue: str, weights: Mapping[str, float] | None = None, *,
         depth: int = 2) -> int:
    """One release step (see :class:`Feeder`)."""
    return Feeder(client, depth=depth).feed(model_id, queue, weights)


def backlog(client: redis.Redis, model_id: str) -> int:
    """Held bulk messages of ``model_id`` (all producers)."""
    return int(client.llen(backlog_key(model_id)))
