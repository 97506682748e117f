"""Bring back the messages of dead workers in seconds, not after the broker's visibility timeout.

kombu's Redis transport keeps every delivered, unacknowledged message in the
hash ``unacked`` (tag -> [message, exchange, routing_key]) with its delivery
time in the sorted set ``unacked_index``, and restores one only after the
visibility timeout (which must exceed the longest job: an hour by default).
Jobs hold a lease while they run (see :mod:`.lease`), so a message that has
been out longer than a lease lifetime while no lease exists for its job
belongs to a worker that died: it is pushed back onto its queue now, the same
way kombu restores it (priority list, consumption end, ``redelivered`` set).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import redis

from .lease import lease_key

__all__ = ["reclaim_abandoned", "UNACKED", "UNACKED_INDEX"]

log = logging.getLogger(__name__)

UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"


def reclaim_abandoned(client: redis.Redis, *, older_than: float, limit: int = 100) -> list[str]:
    """Requeue messages delivered more than ``older_than`` seconds ago whose job holds no lease.

    Returns the job ids requeued. Safe to run from every worker at once (each restore is a transaction).
    """
    ceiling = time.time() - older_than
    requeued = []
    for tag in client.zrangebyscore(UNACKED_INDEX, 0, ceiling, start=0, num=limit):
        job_id = _restore_if_abandoned(client, tag)
        if job_id:
            requeued.append(job_id)
    if requeued:
        log.warning("requeued %d job(s) of dead workers: %s", len(requeued), ", ".join(requeued))
    return requeued


def _restore_if_abandoned(client: redis.Redis, tag: bytes | str) -> str | None:
    with client.pipeline() as pipe:
        try:
            pipe.watch(UNACKED)  # type: ignore[no-untyped-call]
            raw = pipe.hget(UNACKED, tag)
            if raw is None:  # acked meanwhile, or restored by another worker
                pipe.multi()
                pipe.zrem(UNACKED_INDEX, tag)
                pipe.execute()
                return None
            message, _exchange, routing_key = json.loads(raw)
            job_id = _job_id(message)
            if job_id is None or pipe.exists(lease_key(job_id)):
                pipe.unwatch()  # type: ignore[no-untyped-call]
                return None
            pipe.multi()
            pipe.zrem(UNACKED_INDEX, tag)
            pipe.hdel(UNACKED, tag)
            pipe.rpush(_queue_key(routing_key, message), json.dumps(_mark_redelivered(message)))
            pipe.execute()
            return job_id
        except redis.WatchError:
            return None


def _job_id(message: dict[str, Any]) -> str | None:
    headers = message.get("headers") or {}
    value = headers.get("id") or (message.get("properties") or {}).get("correlation_id")
    return str(value) if value else None


def _queue_key(routing_key: str, message: dict[str, Any]) -> str:
    priority = int((message.get("properties") or {}).get("priority") or 0)
    priority = min(max(priority, 0), 9)
    return f"{routing_key}:{priority}" if priority else routing_key


def _mark_redelivered(message: dict[str, Any]) -> dict[str, Any]:
    message.setdefault("headers", {})["redelivered"] = True
    message.setdefault("properties", {}).setdefault("delivery_info", {})["redelivered"] = True
    return message
