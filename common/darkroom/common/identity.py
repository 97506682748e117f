"""Who submitted a job: signed submissions, verified by workers before anything else happens.

**Signing (the SDK).** With a key from the producer registry (:mod:`.producers`), every job the SDK
submits carries an envelope field beside its own fields, in the broker message and in the stored
record::

    "auth": {"producer": "team-a", "key_id": "3f2a9c01", "timestamp": 1765000000,
             "signature": "v1,<base64 HMAC-SHA256>"}

The HMAC covers ``darkroom-job-v1``, the producer id, the key id, the timestamp and the job's
canonical JSON (every field but ``auth`` and ``schema_version``, keys sorted, no spaces), so no
field can change without breaking it. :func:`~darkroom.common.lifecycle.message_job` strips the
envelope before the job is validated.

**Verifying (the worker).** :class:`Gate` decides before any object is read. Signing is required when
``DARKROOM_REQUIRE_SIGNED_JOBS`` is true or any producer is registered; otherwise (one producer: the
embedded services, the demo) nothing changes. When required:

- a job whose record exists runs from the record (:meth:`Lifecycle.start
  <darkroom.common.lifecycle.Lifecycle.start>`), so the record's envelope is what is checked. A record
  that does not verify is that submitter's own: it fails ``unauthenticated`` without running and
  without webhooks (its submitter is unknown). A message pointing at a record that verifies changes
  nothing in it, whoever sent the message.
- a message without a record (a plain Celery producer, or the record expired) must verify itself and
  be younger than ``DARKROOM_SIGNATURE_MAX_AGE_SECONDS`` (replays of old messages); if not, it goes to
  the dead-letter store and no record is written (a refused message cannot take a job id).
- the job's ``producer`` field, if set, must be the signer: a job cannot claim another producer; and its
  id must start with the signer's namespace ``{producer}.`` (``not_permitted``), so that each producer's
  records are keys a Redis ACL user can be limited to.

A verified job then meets its producer's policy (:class:`~darkroom.common.producers.ProducerPolicy`);
the worker records the verified producer in the job's record (``producer``), and webhooks are signed
with that producer's secret, never with the job's field.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import DarkroomError, ErrorCode, FieldError
from .jobs import valid_id
from .jobstore import JobRecord, job_key
from .producers import Producer, ProducerKey, ProducerRegistry
from .status import JobStatus

if TYPE_CHECKING:
    from .boundaries import ReferencePolicy
    from .lifecycle import Lifecycle
    from .quotas import WorkerQuota

__all__ = ["AUTH_FIELD", "Admission", "Auth", "Gate", "Signer", "Unauthenticated", "canonical_job", "sign_job",
           "signing_key", "strip_auth", "verify_job"]

log = logging.getLogger(__name__)

AUTH_FIELD = "auth"
_DOMAIN = "darkroom-job-v1"
_UNSIGNED_FIELDS = frozenset({AUTH_FIELD, "schema_version"})
FUTURE_SKEW_SECONDS = 300
"""How far ahead of the worker's clock a signature's timestamp may be."""


class Unauthenticated(DarkroomError):
    """Raised when a job's signature is missing, stale, unknown or wrong, or it claims another producer."""

    code = ErrorCode.UNAUTHENTICATED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Auth(BaseModel):
    """The signature envelope of one submission."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    producer: str
    key_id: str
    timestamp: int
    signature: str


def canonical_job(job: Mapping[str, Any]) -> bytes:
    """The job's fields (not ``auth`` or ``schema_version``) as compact JSON with sorted keys."""
    data = {k: v for k, v in job.items() if k not in _UNSIGNED_FIELDS}
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _mac(secret: str, producer: str, key_id: str, timestamp: int, job: Mapping[str, Any]) -> str:
    head = f"{_DOMAIN}\n{producer}\n{key_id}\n{timestamp}\n".encode()
    digest = hmac.new(secret.encode(), head + canonical_job(job), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def sign_job(job: Mapping[str, Any], producer: str, key_id: str, secret: str, timestamp: int | None = None) -> Auth:
    """The envelope for ``job`` (its JSON form) signed with one of ``producer``'s keys."""
    ts = int(time.time()) if timestamp is None else timestamp
    return Auth(producer=producer, key_id=key_id, timestamp=ts, signature=_mac(secret, producer, key_id, ts, job))


@dataclass(frozen=True)
class Signer:
    """What the SDK signs with: the producer id and one key (``DARKROOM_PRODUCER_KEY_ID`` / ``_KEY``)."""

    producer: str
    key_id: str
    secret: str

    def envelope(self, job: Mapping[str, Any]) -> dict[str, Any]:
        return sign_job(job, self.producer, self.key_id, self.secret).model_dump()


def strip_auth(payload: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """(the message's job without the envelope, the envelope as sent or None)."""
    data = dict(payload)
    return data, data.pop(AUTH_FIELD, None)


def signing_key(auth: Auth, lookup: Callable[[str], Producer | None], now: float) -> tuple[Producer, ProducerKey]:
    """The registered producer ``auth`` names and its key valid at ``now``; raises :class:`Unauthenticated`."""
    producer = lookup(auth.producer) if valid_id(auth.producer) else None
    if producer is None:
        raise Unauthenticated(f"producer {auth.producer[:80]!r} is not registered")
    key = producer.key(auth.key_id, now)
    if key is None:
        raise Unauthenticated(f"key {auth.key_id[:40]!r} of producer {producer.id!r} is unknown or expired")
    return producer, key


def verify_job(job: Mapping[str, Any], auth: Any, lookup: Callable[[str], Producer | None], *, now: float,
               max_age: float | None) -> Producer:
    """The producer that signed ``job``; raises :class:`Unauthenticated` saying what is wrong.

    ``max_age`` (seconds) refuses older signatures; None skips that check (a stored record).
    """
    if auth is None:
        raise Unauthenticated("the job is not signed; this fleet accepts only signed jobs (set DARKROOM_PRODUCER_ID, "
                              "DARKROOM_PRODUCER_KEY_ID and DARKROOM_PRODUCER_KEY; see darkroom producers add)")
    try:
        envelope = Auth.model_validate(auth)
    except ValidationError:
        raise Unauthenticated("the job's auth envelope is malformed; expected producer, key_id, timestamp and "
                              "signature") from None
    producer, key = signing_key(envelope, lookup, now)
    expected = _mac(key.secret, producer.id, key.key_id, envelope.timestamp, job)
    if not hmac.compare_digest(expected, envelope.signature):
        raise Unauthenticated(f"the signature does not match the job (producer {producer.id!r}, key "
                              f"{key.key_id!r}); was the job changed after it was signed?")
    if envelope.timestamp > now + FUTURE_SKEW_SECONDS:
        raise Unauthenticated(f"the signature's timestamp {envelope.timestamp} lies in the future "
                              f"(now {int(now)}); check the producer's clock")
    if max_age is not None and envelope.timestamp < now - max_age:
        raise Unauthenticated(f"the signature is {int(now - envelope.timestamp)} s old; messages older than "
                              f"{int(max_age)} s are refused (DARKROOM_SIGNATURE_MAX_AGE_SECONDS)")
    claimed = job.get("producer")
    if claimed is not None and claimed != producer.id:
        raise Unauthenticated(f"the job names producer {str(claimed)[:80]!r} but was signed by {producer.id!r}; "
                              "a producer submits only as itself")
    return producer


@dataclass(frozen=True)
class Admission:
    """What :meth:`Gate.admit` decided: run (``producer`` verified, or None when signing is off) or refused."""

    producer: Producer | None = None
    auth: dict[str, Any] | None = None
    refused: ErrorCode | None = None
    reason: str = ""
    retry_after: float | None = None  # refused for now (a quota): deliver again after so many seconds
    policy: ReferencePolicy | None = field(default=None, compare=False)

    @property
    def producer_id(self) -> str | None:
        return None if self.producer is None else self.producer.id


class Gate:
    """Verifies each message (and the record it names) before a worker does anything with it."""

    def __init__(self, client: redis.Redis, *, require: bool, max_age_seconds: float,
                 policy_check: Callable[[Producer, Mapping[str, Any]], tuple[ErrorCode, str] | None] | None = None,
                 quota: WorkerQuota | None = None, cache_seconds: float = 2.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.redis = client
        self.registry = ProducerRegistry(client)
        self.require = require
        self.max_age = max_age_seconds
        self.policy_check = policy_check
        self.quota = quota
        self.cache_seconds = cache_seconds
        self.clock = clock
        self._cache: dict[str, tuple[float, Any]] = {}

    def required(self) -> bool:
        return self.require or bool(self._cached("", self.registry.in_use))

    def lookup(self, producer_id: str) -> Producer | None:
        return self._cached(producer_id, lambda: self.registry.get(producer_id))  # type: ignore[no-any-return]

    def _cached(self, name: str, load: Callable[[], Any]) -> Any:
        now = time.monotonic()
        hit = self._cache.get(name)
        if hit is not None and now - hit[0] < self.cache_seconds:
            return hit[1]
        value = load()
        self._cache[name] = (now, value)
        return value

    # -- the decision ------------------------------------------------------
    def admit(self, payload: Any, lifecycle: Lifecycle) -> Admission:
        """Verify ``payload`` (a task message's argument); a refusal is recorded here (failed record or dead
        letter, see the module docstring) and returned with its code."""
        if not isinstance(payload, Mapping) or not self.required():
            return Admission()
        job_id = payload.get("job_id")
        raw = self.redis.get(job_key(job_id)) if isinstance(job_id, str) and valid_id(job_id) else None
        stored = _stored_job(raw)
        if stored is not None:
            return self._admit_record(lifecycle, raw, *stored)
        if raw is not None:
            return Admission()  # unreadable or ended: the lifecycle dead-letters or skips it; nothing runs
        job, auth = strip_auth(payload)
        try:
            producer = verify_job(job, auth, self.lookup, now=self.clock(), max_age=self.max_age)
        except Unauthenticated as exc:
            lifecycle.dead_letter_message(payload, f"unauthenticated: {exc.message}")
            return self._refused(ErrorCode.UNAUTHENTICATED, exc.message, job_id)
        refusal = self._policy(producer, job)
        if refusal is not None:
            lifecycle.dead_letter_message(payload, f"{refusal[0]}: {refusal[1]}")
            return self._refused(*refusal, job_id)
        return self._quota(producer, job_id) or Admission(producer, auth if isinstance(auth, dict) else None)

    def _admit_record(self, lifecycle: Lifecycle, raw: Any, job: dict[str, Any], auth: Any) -> Admission:
        record = JobRecord.read(raw)
        try:
            producer = verify_job(job, auth, self.lookup, now=self.clock(), max_age=None)
        except Unauthenticated as exc:
            return self._fail(lifecycle, record, ErrorCode.UNAUTHENTICATED, exc.message)
        refusal = self._policy(producer, job)
        if refusal is not None:
            return self._fail(lifecycle, record, *refusal)
        return self._quota(producer, record.job_id) or Admission(producer)

    def _quota(self, producer: Producer, job_id: Any) -> Admission | None:
        """A valid job past its producer's quota waits (deferred, never failed); None when it may start."""
        if self.quota is None or not isinstance(job_id, str):
            return None
        wait = self.quota.take(producer.id, producer.policy, job_id)
        if wait is None:
            return None
        log.info("holding back job %s: [quota_exceeded] %s; again in %.0f s", job_id[:80], wait.message,
                 wait.retry_after)
        return Admission(producer, refused=ErrorCode.QUOTA_EXCEEDED, reason=wait.message,
                         retry_after=wait.retry_after)

    def _policy(self, producer: Producer, job: Mapping[str, Any]) -> tuple[ErrorCode, str] | None:
        job_id = job.get("job_id")
        if not isinstance(job_id, str) or not job_id.startswith(producer.namespace):
            return ErrorCode.NOT_PERMITTED, (f"job id {str(job_id)[:80]!r} lies outside producer {producer.id!r}'s "
                                             f"namespace: its job ids start with {producer.namespace!r}")
        return None if self.policy_check is None else self.policy_check(producer, job)

    def _fail(self, lifecycle: Lifecycle, record: JobRecord, code: ErrorCode, message: str) -> Admission:
        if lifecycle.refuse(record, code, message) is None:
            lifecycle.note(record.job_id, "refused_message", code=code.value, error=message[:500])
        return self._refused(code, message, record.job_id)

    @staticmethod
    def _refused(code: ErrorCode, message: str, job_id: Any) -> Admission:
        log.warning("refused job %s: [%s] %s", str(job_id)[:80], code.value, message)
        return Admission(refused=code, reason=message)


def _stored_job(raw: Any) -> tuple[dict[str, Any], Any] | None:
    """(job, auth) of a stored record that may still run; None when there is none or it cannot run."""
    if raw is None:
        return None
    try:
        stored = json.loads(raw)
        record = JobRecord.read(raw)
    except (ValueError, DarkroomError):
        return None
    if record.status.is_terminal or record.status is not JobStatus.QUEUED and record.status is not JobStatus.STARTED:
        return None
    job = stored.get("job")
    return (job, stored.get(AUTH_FIELD)) if isinstance(job, dict) else None


def field_refusal(code: ErrorCode, errors: list[FieldError]) -> tuple[ErrorCode, str]:
    """A policy refusal as (code, message) naming every refused field."""
    return code, "; ".join(str(e) for e in errors)
