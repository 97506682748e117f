"""Signed cancels: the SDK asks, a worker checks who asks, and only the job's own producer is obeyed.

Once producers are registered, a cancel is a request, not a write. A signing client pushes onto
``darkroom:cancels``::

    {"job_id": "team-a.3f…", "submission": "…", "request_id": "9c…",
     "auth": {"producer": "team-a", "key_id": "…", "timestamp": 1765000000, "signature": "v1,…"}}

The HMAC (the producer's signing key, :mod:`.identity`) covers ``darkroom-cancel-v1``, the producer,
key id, timestamp, job id, the record's ``submission`` (so a request cancels the submission it was
made for, never a later resubmission) and the request id. Any worker takes the request
(:class:`CancelDesk`), verifies it like a submission (registered producer, live key, no older than
``DARKROOM_SIGNATURE_MAX_AGE_SECONDS``), and cancels the job only if the signer is the job's own
producer: the producer a worker verified when it started the job, or else the one whose signature
on the record verifies. Anything else is refused with ``unauthenticated`` or ``not_permitted``
(counted in ``darkroom_jobs_refused``, noted in the job's history) and the job goes on. The answer
goes to ``darkroom:job:{job_id}:cancel-reply:{request_id}`` (a key in the job's namespace, so the
asking producer's Redis user may read it), where the SDK waits for it.

Without a registry (one producer: the embedded services, the demo) the SDK cancels directly
through the lifecycle, as before.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ErrorCode
from .identity import FUTURE_SKEW_SECONDS, Auth, Signer, Unauthenticated, signing_key, verify_job
from .jobs import valid_id
from .jobstore import JobRecord, job_key
from .lifecycle import Lifecycle
from .producers import Producer

__all__ = ["CANCELS_KEY", "CancelAnswer", "CancelDesk", "CancelRequest", "reply_key", "sign_cancel"]

log = logging.getLogger(__name__)

CANCELS_KEY = "darkroom:cancels"
"""The list signed cancel requests wait in until a worker takes them."""
REPLY_TTL_SECONDS = 120
_DOMAIN = "darkroom-cancel-v1"


def reply_key(job_id: str, request_id: str) -> str:
    return f"darkroom:job:{job_id}:cancel-reply:{request_id}"


class CancelRequest(BaseModel):
    """One cancel as the SDK sends it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str
    submission: str
    request_id: str
    auth: Auth | None = None


@dataclass(frozen=True)
class CancelAnswer:
    """What the worker did: ``code`` None when it obeyed (``status``: the job's status after, None: no such
    job), else why not."""

    status: str | None = None
    code: ErrorCode | None = None
    message: str = ""

    def dumps(self) -> str:
        return json.dumps({"status": self.status, "code": None if self.code is None else self.code.value,
                           "message": self.message})

    @classmethod
    def loads(cls, raw: Any) -> CancelAnswer:
        data = json.loads(raw)
        code = data.get("code")
        return cls(data.get("status"), None if code is None else ErrorCode(code), str(data.get("message", "")))


def _mac(secret: str, producer: str, key_id: str, timestamp: int, job_id: str, submission: str,
         request_id: str) -> str:
    text = f"{_DOMAIN}\n{producer}\n{key_id}\n{timestamp}\n{job_id}\n{submission}\n{request_id}".encode()
    return "v1," + base64.b64encode(hmac.new(secret.encode(), text, hashlib.sha256).digest()).decode()


def sign_cancel(signer: Signer, job_id: str, submission: str, *, request_id: str | None = None,
                timestamp: int | None = None) -> CancelRequest:
    """A cancel request for ``job_id`` (its current ``submission``) signed with ``signer``'s key."""
    rid = request_id or secrets.token_hex(8)
    ts = int(time.time()) if timestamp is None else timestamp
    auth = Auth(producer=signer.producer, key_id=signer.key_id, timestamp=ts,
                signature=_mac(signer.secret, signer.producer, signer.key_id, ts, job_id, submission, rid))
    return CancelRequest(job_id=job_id, submission=submission, request_id=rid, auth=auth)


def verify_cancel(request: CancelRequest, lookup: Callable[[str], Producer | None], *, now: float,
                  max_age: float) -> Producer:
    """The producer that signed ``request``; raises :class:`~.identity.Unauthenticated` saying what is wrong."""
    auth = request.auth
    if auth is None:
        raise Unauthenticated("the cancel is not signed; this fleet obeys only cancels signed by the job's producer "
                              "(set DARKROOM_PRODUCER_ID, DARKROOM_PRODUCER_KEY_ID and DARKROOM_PRODUCER_KEY)")
    producer, key = signing_key(auth, lookup, now)
    expected = _mac(key.secret, producer.id, key.key_id, auth.timestamp, request.job_id, request.submission,
                    request.request_id)
    if not hmac.compare_digest(expected, auth.signature):
        raise Unauthenticated(f"the cancel's signature does not match (producer {producer.id!r}, key {key.key_id!r})")
    if not now - max_age <= auth.timestamp <= now + FUTURE_SKEW_SECONDS:
        raise Unauthenticated(f"the cancel was signed at {auth.timestamp}, more than {int(max_age)} s from now "
                              f"({int(now)}); send it again (DARKROOM_SIGNATURE_MAX_AGE_SECONDS)")
    return producer


class CancelDesk:
    """The worker's side: takes cancel requests off ``darkroom:cancels`` and answers each one."""

    def __init__(self, client: redis.Redis, lifecycle: Lifecycle, lookup: Callable[[str], Producer | None], *,
                 max_age_seconds: float, on_refused: Callable[[ErrorCode], None] = lambda code: None,
                 clock: Callable[[], float] = time.time) -> None:
        self.redis = client
        self.lifecycle = lifecycle
        self.lookup = lookup
        self.max_age = max_age_seconds
        self.on_refused = on_refused
        self.clock = clock

    def serve_once(self, timeout: float = 1.0) -> CancelAnswer | None:
        """Take one request (waiting up to ``timeout`` seconds) and answer it; None when none came."""
        popped = self.redis.blpop([CANCELS_KEY], timeout=max(1, int(timeout)))
        if popped is None:
            return None
        return self.handle(popped[1])

    def handle(self, raw: Any) -> CancelAnswer:
        try:
            request = CancelRequest.model_validate_json(raw)
        except ValidationError:
            log.warning("dropped a malformed cancel request (%d bytes)", len(raw or b""))
            self.on_refused(ErrorCode.UNAUTHENTICATED)
            return CancelAnswer(code=ErrorCode.UNAUTHENTICATED, message="malformed cancel request")
        answer = self._decide(request)
        if answer.code is not None:
            self.on_refused(answer.code)
            log.warning("refused a cancel of job %s: [%s] %s", request.job_id[:80], answer.code.value, answer.message)
            if valid_id(request.job_id):
                self.lifecycle.note(request.job_id, "refused_cancel", code=answer.code.value,
                                    error=answer.message[:500])
        if valid_id(request.job_id):
            key = reply_key(request.job_id, request.request_id[:64])
            pipe = self.redis.pipeline(transaction=False)
            pipe.rpush(key, answer.dumps())
            pipe.expire(key, REPLY_TTL_SECONDS)
            pipe.execute()
        return answer

    def _decide(self, request: CancelRequest) -> CancelAnswer:
        try:
            producer = verify_cancel(request, self.lookup, now=self.clock(), max_age=self.max_age)
        except Unauthenticated as exc:
            return CancelAnswer(code=ErrorCode.UNAUTHENTICATED, message=exc.message)
        raw = self.redis.get(job_key(request.job_id)) if valid_id(request.job_id) else None
        if raw is None:
            return CancelAnswer(message=f"no job {request.job_id[:80]!r}")  # status None: not found
        record = JobRecord.read(raw)
        owner = self._owner(record, raw)
        if owner != producer.id:
            return CancelAnswer(code=ErrorCode.NOT_PERMITTED,
                                message=f"job {record.job_id} is not producer {producer.id!r}'s; a producer cancels "
                                        "only its own jobs")
        if record.submission != request.submission:
            return CancelAnswer(record.status.value, ErrorCode.NOT_PERMITTED,
                                f"the cancel was for submission {request.submission!r}; the job was submitted again "
                                "since (nothing changed)")
        done, _ = self.lifecycle.cancel(request.job_id, f"cancelled on request of producer {producer.id!r}")
        return CancelAnswer(None if done is None else done.status.value)

    def _owner(self, record: JobRecord, raw: Any) -> str | None:
        """The job's producer as a worker vouches for it: the verified producer, else the record's valid signer."""
        if record.producer is not None:
            return record.producer
        try:
            stored = json.loads(raw)
            return verify_job(stored.get("job") or {}, stored.get("auth"), self.lookup, now=self.clock(),
                              max_age=None).id
        except (Unauthenticated, ValueError, AttributeError):
            return None
