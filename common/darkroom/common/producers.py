"""The producer registry: who may submit jobs, with which signing keys, under which policy.

One Redis hash, ``darkroom:producers``: producer id -> :class:`Producer` as JSON. Each producer has
one or more signing keys (:class:`ProducerKey`); ``rotate`` adds a new key and gives the others an
expiry, so messages signed with the old key still verify during the overlap. Managed with
``darkroom producers add|list|rotate|remove|acl``.

The registry holds the keys in clear: workers need them to verify (HMAC is symmetric). Whoever can
read this hash can sign as any producer, so producers must not: give each one a Redis ACL user
(:func:`acl_lines`) that cannot read it. See docs/security.md, "Producers and isolation".
"""

from __future__ import annotations

import base64
import re
import secrets
import time
from collections.abc import Iterable

import redis
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import DarkroomError
from .jobs import Priority

__all__ = ["REGISTRY_KEY", "KEY_PREFIX", "job_namespace", "policy_key", "Producer", "ProducerKey", "ProducerPolicy", "ProducerRegistry",
           "UnknownProducer", "acl_lines", "new_key"]

REGISTRY_KEY = "darkroom:producers"
_PRODUCER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,63}")


def job_namespace(producer_id: str) -> str:
    """``{producer}.``: with a producer registry every job id of the producer starts so (a producer id has no
    '.', so no namespace holds another)."""
    return f"{producer_id}."


def policy_key(producer_id: str) -> str:
    """The producer's policy alone (no keys), readable by its own Redis user: the SDK checks it early."""
    return f"darkroom:producers:policy:{producer_id}"

KEY_PREFIX = "dk_"
"""Signing keys read ``dk_`` + 32 random bytes in URL-safe base64."""


class UnknownProducer(DarkroomError, KeyError):
    """Raised when a producer id is not in the registry."""


def new_key() -> tuple[str, str]:
    """A new (key id, signing key)."""
    return secrets.token_hex(4), KEY_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


class ProducerKey(BaseModel):
    """One signing key; valid until ``expires_at`` (epoch seconds; None: no expiry)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    key_id: str
    secret: str
    created_at: float
    expires_at: float | None = None

    def valid_at(self, now: float) -> bool:
        return self.expires_at is None or now < self.expires_at


class ProducerPolicy(BaseModel):
    """What one producer's jobs may do. An empty list allows anything; None sets no limit.

    Prefixes are ``s3://bucket/prefix`` (a bucket alone: the whole bucket).
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    read_prefixes: list[str] = Field(default_factory=list, description="Where inputs, adapters and embeddings "
                                                                       "may be read from.")
    write_prefixes: list[str] = Field(default_factory=list, description="Where outputs may be written.")
    models: list[str] = Field(default_factory=list, description="Model ids the producer may use.")
    adapters: list[str] = Field(default_factory=list, description="Registry adapter ids the producer may use.")
    max_priority: Priority = Field(default=Priority.INTERACTIVE, description="bulk: interactive jobs are refused.")
    max_job_cost: int | None = Field(default=None, ge=1, description="Highest images x pixels x steps of one job.")
    max_in_flight: int | None = Field(default=None, ge=1, description="Queued plus running jobs at once.")
    max_per_minute: int | None = Field(default=None, ge=1, description="Submissions per minute.")


class Producer(BaseModel):
    """One registered producer: its id, its keys (newest last), its policy and its fair-share weight."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str
    keys: list[ProducerKey] = Field(default_factory=list)
    policy: ProducerPolicy = Field(default_factory=lambda: ProducerPolicy())
    weight: float = Field(default=1.0, gt=0)
    created_at: float = 0.0

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not _PRODUCER_ID.fullmatch(v):
            raise ValueError(f"producer id {v!r} must be 1-64 letters, digits, '_' or '-', starting alphanumeric "
                             "(no '.': a producer's job ids start with '<id>.')")
        return v

    @property
    def namespace(self) -> str:
        """The start of every job id of this producer (its records' keys: Redis ACL patterns can name them)."""
        return job_namespace(self.id)

    def key(self, key_id: str, now: float) -> ProducerKey | None:
        """The key ``key_id`` if it is valid at ``now``."""
        for key in self.keys:
            if key.key_id == key_id and key.valid_at(now):
                return key
        return None

    def live_keys(self, now: float) -> list[ProducerKey]:
        return [k for k in self.keys if k.valid_at(now)]


class ProducerRegistry:
    """Reads and changes the registry (one Redis hash)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def now(self) -> float:
        return time.time()

    # -- reads --------------------------------------------------------------
    def get(self, producer_id: str) -> Producer | None:
        raw = self.redis.hget(REGISTRY_KEY, producer_id)
        return None if raw is None else Producer.model_validate_json(raw)

    def require(self, producer_id: str) -> Producer:
        found = self.get(producer_id)
        if found is None:
            raise UnknownProducer(producer_id)
        return found

    def all(self) -> list[Producer]:
        raw = self.redis.hgetall(REGISTRY_KEY)
        return sorted((Producer.model_validate_json(v) for v in raw.values()), key=lambda p: p.id)

    def policy(self, producer_id: str) -> ProducerPolicy | None:
        """The producer's policy as its own Redis user may read it (no keys)."""
        raw = self.redis.get(policy_key(producer_id))
        return None if raw is None else ProducerPolicy.model_validate_json(raw)

    def in_use(self) -> bool:
        """Whether any producer is registered (then every job must be signed)."""
        return bool(self.redis.exists(REGISTRY_KEY))

    # -- changes ---------------------------------------------------------------
    def add(self, producer_id: str, policy: ProducerPolicy | None = None, weight: float = 1.0) -> tuple[Producer, str]:
        """Register a producer with a first key; returns it and the key. ValueError if the id exists."""
        key_id, secret = new_key()
        now = self.now()
        producer = Producer(id=producer_id, keys=[ProducerKey(key_id=key_id, secret=secret, created_at=now)],
                            policy=policy or ProducerPolicy(), weight=weight, created_at=now)
        if not self.redis.hsetnx(REGISTRY_KEY, producer_id, producer.model_dump_json()):
            raise ValueError(f"producer {producer_id!r} exists already; use rotate for a new key")
        self.redis.set(policy_key(producer_id), producer.policy.model_dump_json())
        return producer, secret

    def rotate(self, producer_id: str, overlap_seconds: float) -> tuple[Producer, ProducerKey]:
        """A new key for ``producer_id``; the keys it had stay valid ``overlap_seconds`` more (no longer than
        they already were). Keys that expired are dropped."""
        key_id, secret = new_key()

        def change(current: Producer, now: float) -> Producer:
            until = now + overlap_seconds
            kept = [k.model_copy(update={"expires_at": min(until, k.expires_at or until)})
                    for k in current.live_keys(now)]
            return current.model_copy(update={"keys": [*kept, ProducerKey(key_id=key_id, secret=secret,
                                                                          created_at=now)]})

        updated = self._update(producer_id, change)
        return updated, updated.keys[-1]

    def set_policy(self, producer_id: str, policy: ProducerPolicy, weight: float | None = None) -> Producer:
        def change(current: Producer, now: float) -> Producer:
            return current.model_copy(update={"policy": policy, "weight": weight or current.weight})

        updated = self._update(producer_id, change)
        self.redis.set(policy_key(producer_id), updated.policy.model_dump_json())
        return updated

    def remove(self, producer_id: str) -> bool:
        self.redis.delete(policy_key(producer_id))
        return bool(self.redis.hdel(REGISTRY_KEY, producer_id))

    def _update(self, producer_id: str, change: object) -> Producer:
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(REGISTRY_KEY)  # type: ignore[no-untyped-call]
                    raw = pipe.hget(REGISTRY_KEY, producer_id)
                    if raw is None:
                        raise UnknownProducer(producer_id)
                    updated = change(Producer.model_validate_json(raw), self.now())  # type: ignore[operator]
                    pipe.multi()
                    pipe.hset(REGISTRY_KEY, producer_id, updated.model_dump_json())
                    pipe.execute()
                    return updated  # type: ignore[no-any-return]
                except redis.WatchError:
                    continue


def acl_lines(producer_id: str, password: str, queues: Iterable[str] = ("darkroom.img2img*",)) -> list[str]:
    """``ACL SETUSER`` lines for a Redis user that submits, follows and cancels jobs as ``producer_id`` and
    cannot read the producer registry (so it cannot sign as anyone else) nor consume queues.

    Its records are those under its job-id namespace (``{id}.``); the jobs indexes, the dead letters and the
    webhook outbox are shared keys (its scripts write them); see docs/security.md for what that leaves open.
    """
    user = f"darkroom-producer-{producer_id}"
    space = job_namespace(producer_id)
    keys = [
        f"~darkroom:job:{space}*",         # its records, progress, history, cancel flags: only its own job ids
        "~darkroom:jobs", "~darkroom:jobs:open",
        f"~darkroom:lease:{space}*",       # a cancel's compare-and-set names the lease key
        "~darkroom:dead-letters", "~darkroom:dead-letters:index",
        "~darkroom:webhooks:outbox",
        "%R~darkroom:worker:*", "%R~darkroom:workers*", "%R~darkroom:models*",  # the catalog and routes
        f"%R~{policy_key(producer_id)}",  # its own policy (the SDK's early check); never the registry
        f"~darkroom:quota:{producer_id}:*",  # the SDK's early quota count (workers keep their own, out of reach)
        "%W~darkroom:cancels",             # signed cancel requests (a worker verifies them); never pop them
        "%W~darkroom:fair:*",              # fair share: the producers with held bulk work, the backlog tokens
        *[f"%W~{q}" for q in queues],      # push messages; never pop them
    ]
    commands = ["+@connection", "+get", "+mget", "+exists", "+hget", "+hgetall", "+hmget", "+smembers", "+type",
                "+ttl", "+lrange", "+llen", "+blpop", "+zrange", "+zrangebyscore", "+zrevrangebyscore", "+zscore", "+zcard",
                "+eval", "+evalsha", "+script|load", "+script|exists", "+time",
                "+subscribe", "+unsubscribe", "+psubscribe", "+punsubscribe", "+publish",
                # what the submit, cancel and quota scripts write (each only on the keys above)
                "+set", "+del", "+expire", "+pexpire", "+rename", "+lpush", "+rpush", "+ltrim", "+sadd", "+zadd",
                "+zrem", "+zremrangebyscore", "+incrby", "+hset", "+hdel"]
    return [f"ACL SETUSER {user} reset on >{password} resetchannels &darkroom:events* " + " ".join(keys + commands)]
