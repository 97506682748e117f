"""Webhook deliveries in Redis: taking outbox entries reliably, scheduled retries, dead letters.

Keys (status changes push to the outbox; everything else is the dispatcher's)::

    darkroom:webhooks:outbox               LIST    entries pushed with each status change (JobStore)
    darkroom:webhooks:processing:{name}    LIST    entries dispatcher {name} took and has not settled
    darkroom:webhooks:dispatchers          SET     names of dispatchers that may hold entries
    darkroom:webhooks:dispatcher:{name}    STRING  heartbeat; expires when the dispatcher is gone
    darkroom:webhooks:retries              ZSET    delivery JSON scored by the epoch second it is due
    darkroom:webhooks:dead                 HASH    webhook id -> delivery JSON with every attempt
    darkroom:webhooks:dead:index           ZSET    webhook id -> when it died (trimmed by retention and count)
    darkroom:webhooks:throttle:{job_id}    STRING  present while a job's progress events are held back

An entry moves outbox -> processing (``BLMOVE``, atomic) and leaves processing only
in the same transaction that settles it (delivered, rescheduled or dead), so a
dispatcher that dies mid-delivery loses nothing: its list goes back to the outbox
when its heartbeat has expired (at-least-once; the ``webhook-id`` stays the same).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, Field

from darkroom.common.bounds import keep_bounded
from darkroom.common.webhooks import (
    DEAD_INDEX_KEY,
    DEAD_KEY,
    DISPATCHERS_KEY,
    OUTBOX_KEY,
    RETRIES_KEY,
    OutboxEntry,
    dispatcher_key,
    processing_key,
    throttle_key,
)

__all__ = ["Attempt", "DeadLetters", "Delivery", "DeliveryQueue", "RETRIES_KEY", "DEAD_KEY"]


# Bury one delivery: take it off the processing list, keep it, and trim the store by age and count.
# KEYS: processing, dead hash, dead index. ARGV: raw entry, id, delivery JSON, retention s, max count.
_BURY = "redis.call('LREM', KEYS[1], 1, ARGV[1])\n" + keep_bounded(
    "KEYS[2]", "KEYS[3]", "ARGV[2]", "ARGV[3]", "ARGV[4]", "ARGV[5]") + "return 1\n"

# Move up to ARGV[2] entries due by ARGV[1] from the retry set to a processing list, atomically.
_PROMOTE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
    redis.call('ZREM', KEYS[1], member)
    redis.call('LPUSH', KEYS[2], member)
end
return due
"""


def heartbeat_key(name: str) -> str:
    return dispatcher_key(name)


class Attempt(BaseModel):
    """One try at delivering: when, the HTTP status (None when no response) and what went wrong."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    at: datetime
    status: int | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    def describe(self) -> str:
        if self.error:
            return self.error
        return f"HTTP {self.status}"


class Delivery(OutboxEntry):
    """An outbox entry plus its delivery history."""

    attempts: list[Attempt] = Field(default_factory=list)
    replays: int = 0
    dead_at: datetime | None = None

    def with_attempt(self, attempt: Attempt) -> Delivery:
        return self.model_copy(update={"attempts": [*self.attempts, attempt]})


class DeliveryQueue:
    """One dispatcher's view of the outbox: take entries, then settle each exactly once."""

    def __init__(self, client: redis.Redis, name: str, *, dead_retention_seconds: int = 30 * 24 * 3600,
                 dead_max: int = 10_000) -> None:
        self.redis = client
        self.name = name
        self.processing = processing_key(name)
        self.dead_retention = dead_retention_seconds
        self.dead_max = dead_max
        self._promote = client.register_script(_PROMOTE_DUE)
        self._bury = client.register_script(_BURY)

    # -- taking ------------------------------------------------------------
    def take(self, timeout: float) -> str | None:
        """The oldest outbox entry, moved to this dispatcher's processing list; None after ``timeout``."""
        # Redis >= 6 takes fractions of a second here; redis-py's stub says int
        raw = self.redis.blmove(OUTBOX_KEY, self.processing, timeout, "RIGHT", "LEFT")  # type: ignore[arg-type]
        return None if raw is None else _text(raw)

    def take_due(self, now: float) -> str | None:
        """A retry that is due by ``now``, moved to this dispatcher's processing list."""
        due = self._promote(keys=[RETRIES_KEY, self.processing], args=[now, 1])
        return _text(due[0]) if due else None

    # -- settling ----------------------------------------------------------
    def finish(self, raw: str) -> None:
        """Done with an entry (delivered, or given up without a dead letter)."""
        self.redis.lrem(self.processing, 1, raw)

    def retry(self, raw: str, delivery: Delivery, due: float) -> None:
        """Schedule the next attempt at epoch second ``due``."""
        with self.redis.pipeline() as pipe:
            pipe.lrem(self.processing, 1, raw)
            pipe.zadd(RETRIES_KEY, {delivery.model_dump_json(): due})
            pipe.execute()

    def bury(self, raw: str, delivery: Delivery) -> None:
        """Keep a delivery whose schedule is exhausted in the dead-letter store."""
        dead = delivery.model_copy(update={"dead_at": datetime.now(UTC)})
        self._bury(keys=[self.processing, DEAD_KEY, DEAD_INDEX_KEY],
                   args=[raw, dead.id, dead.model_dump_json(), self.dead_retention, self.dead_max])

    def throttle(self, job_id: str, seconds: float) -> bool:
        """True if a progress event of ``job_id`` may go now (then holds the next ones for ``seconds``)."""
        key = throttle_key(job_id)
        return bool(self.redis.set(key, b"1", px=max(1, int(seconds * 1000)), nx=True))

    # -- liveness and recovery -----------------------------------------------
    def heartbeat(self, ttl_seconds: float) -> None:
        with self.redis.pipeline() as pipe:
            pipe.sadd(DISPATCHERS_KEY, self.name)
            pipe.set(heartbeat_key(self.name), b"1", px=int(ttl_seconds * 1000))
            pipe.execute()

    def recover(self) -> int:
        """At start: return entries left in processing by a crashed run of this name, or a dead dispatcher."""
        return self._requeue(self.name) + self.recover_dead()

    def recover_dead(self) -> int:
        """Return entries held by dispatchers whose heartbeat has expired (never this one's own)."""
        moved = 0
        for member in self.redis.smembers(DISPATCHERS_KEY):
            name = _text(member)
            if name != self.name and not self.redis.exists(heartbeat_key(name)):
                moved += self._requeue(name)
                self.redis.srem(DISPATCHERS_KEY, name)
        return moved

    def leave(self) -> int:
        """Clean stop: give back anything unsettled and drop the heartbeat."""
        moved = self._requeue(self.name)
        with self.redis.pipeline() as pipe:
            pipe.delete(heartbeat_key(self.name))
            pipe.srem(DISPATCHERS_KEY, self.name)
            pipe.execute()
        return moved

    def _requeue(self, name: str) -> int:
        moved = 0
        # processing is newest-first; moving from its left to the outbox's right keeps the oldest next
        while self.redis.lmove(processing_key(name), OUTBOX_KEY, "LEFT", "RIGHT") is not None:
            moved += 1
        return moved


class DeadLetters:
    """The dead-letter store: deliveries whose retry schedule ran out, for listing and replay."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def entries(self) -> list[Delivery]:
        """Every dead letter, oldest first."""
        raw: dict[bytes, bytes] = self.redis.hgetall(DEAD_KEY)  # type: ignore[assignment]
        items = [Delivery.model_validate_json(value) for value in raw.values()]
        return sorted(items, key=lambda d: d.dead_at or datetime.min.replace(tzinfo=UTC))

    def get(self, webhook_id: str) -> Delivery | None:
        raw = self.redis.hget(DEAD_KEY, webhook_id)
        return None if raw is None else Delivery.model_validate_json(_text(raw))

    def replay(self, webhook_id: str) -> bool:
        """Move one dead letter back to the outbox with a fresh schedule (same webhook-id); False if absent."""
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    return self._replay(pipe, webhook_id)
                except redis.WatchError:
                    continue

    def counts(self) -> dict[str, int]:
        """How many entries wait in the outbox, for a retry, and as dead letters."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.llen(OUTBOX_KEY)
            pipe.zcard(RETRIES_KEY)
            pipe.hlen(DEAD_KEY)
            outbox, retries, dead = pipe.execute()
        return {"outbox": outbox, "retrying": retries, "dead": dead}

    @staticmethod
    def _replay(pipe: Any, webhook_id: str) -> bool:
        pipe.watch(DEAD_KEY)
        raw = pipe.hget(DEAD_KEY, webhook_id)
        if raw is None:
            pipe.unwatch()
            return False
        dead = Delivery.model_validate_json(raw)
        fresh = dead.model_copy(update={"attempts": [], "replays": dead.replays + 1, "dead_at": None})
        pipe.multi()
        pipe.hdel(DEAD_KEY, webhook_id)
        pipe.zrem(DEAD_INDEX_KEY, webhook_id)
        pipe.lpush(OUTBOX_KEY, fresh.model_dump_json())
        pipe.execute()
        return True


def _text(value: Any) -> str:
    """A Redis reply as text (the client returns bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)
