"""Webhooks: the outbox that status changes write to, the signing scheme and the URL policy.

A job with a ``callback_url`` gets one outbox entry per event it wants, pushed in
the same Redis transaction as the status change (:func:`outbox_push`). The
dispatcher (``darkroom dispatcher``, its own process, never a GPU worker) delivers
them as ``POST`` requests signed per Standard Webhooks (standardwebhooks.com)::

    webhook-id:        msg_...            same on every retry: the idempotency key
    webhook-timestamp: 1700000000         seconds since the epoch, per attempt
    webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">

    {"type": "job.succeeded", "timestamp": "...", "data": {"job_id": ..., "status": ..., "result": {...}}}

``result`` (succeeded: outputs with their safety verdicts) and ``details`` (failed: timings
so far and the input precheck's verdict) are null on other events.

Receivers check a request with :func:`verify`. :func:`check_callback_url` refuses
URLs that reach loopback, private, link-local or cloud metadata addresses.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import secrets
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict

from .errors import DarkroomError
from .events import EventType, JobEvent
from .redaction import redact_parameters
from .results import FailureDetails, JobResult

if TYPE_CHECKING:
    from .jobstore import JobRecord

__all__ = [
    "OUTBOX_KEY",
    "CallbackTarget",
    "OutboxEntry",
    "WebhookVerificationError",
    "check_callback_url",
    "generate_secret",
    "outbox_entry",
    "outbox_push",
    "resolve_callback",
    "sign",
    "verify",
    "wants",
    "webhook_body",
]

OUTBOX_KEY = "darkroom:webhooks:outbox"
# The dispatcher's keys (producer side; workers read the stats for /metrics).
RETRIES_KEY = "darkroom:webhooks:retries"
DEAD_KEY = "darkroom:webhooks:dead"
DEAD_INDEX_KEY = "darkroom:webhooks:dead:index"
DISPATCHERS_KEY = "darkroom:webhooks:dispatchers"
STATS_KEY = "darkroom:webhooks:stats"


def processing_key(dispatcher: str) -> str:
    """A dispatcher's in-flight list (entries move outbox -> processing atomically)."""
    return f"darkroom:webhooks:processing:{dispatcher}"


def dispatcher_key(dispatcher: str) -> str:
    """A dispatcher's heartbeat."""
    return f"darkroom:webhooks:dispatcher:{dispatcher}"


def throttle_key(job_id: str) -> str:
    """Present while a job's progress webhooks are held back."""
    return f"darkroom:webhooks:throttle:{job_id}"
TERMINAL_EVENTS = frozenset({EventType.SUCCEEDED, EventType.FAILED, EventType.CANCELLED})
_SECRET_PREFIX = "whsec_"

Resolver = Callable[..., list[tuple[Any, ...]]]


class WebhookVerificationError(DarkroomError):
    """Raised when a webhook request's signature or timestamp does not check out; reject the request."""


# -- the outbox -------------------------------------------------------------
class OutboxEntry(BaseModel):
    """One event to deliver to one job's callback URL, as pushed to :data:`OUTBOX_KEY`."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str
    job_id: str
    url: str
    producer: str | None = None  # as the job named it: informative only, never chooses a secret
    verified_producer: str | None = None  # as a worker verified it (identity.Gate): the secret that signs
    terminal: bool
    event: JobEvent
    result: JobResult | None = None
    details: FailureDetails | None = None


def wants(record: JobRecord, event: JobEvent) -> bool:
    """Whether the job asked for this event at its callback URL: every status change unless it listed the
    events it wants; progress only when listed (it would fill the outbox otherwise)."""
    job = record.job
    if job is None or not job.callback_url:
        return False
    if job.webhook_events is None:
        return event.type is not EventType.PROGRESS
    return event.type in job.webhook_events


def outbox_push(pipe: Any, record: JobRecord, event: JobEvent) -> None:
    """Queue a delivery of ``event`` on ``pipe`` (a Redis pipeline of the same transition)."""
    entry = outbox_entry(record, event)
    if entry is not None:
        pipe.lpush(OUTBOX_KEY, entry)


def outbox_entry(record: JobRecord, event: JobEvent) -> str | None:
    """The outbox entry (JSON) of ``event`` if the job wants it at its callback URL, else None."""
    if not wants(record, event):
        return None
    assert record.job is not None and record.job.callback_url is not None
    entry = OutboxEntry(
        id=f"msg_{uuid.uuid4().hex}",
        job_id=record.job_id,
        url=record.job.callback_url,
        producer=record.job.producer,
        verified_producer=record.producer,
        terminal=event.type in TERMINAL_EVENTS,
        event=event,
        result=record.result if event.type is EventType.SUCCEEDED else None,
        details=record.details if event.type is EventType.FAILED else None,
    )
    return entry.model_dump_json()


def webhook_body(entry: OutboxEntry) -> bytes:
    """The JSON body receivers get: ``{"type": "job.<event>", "timestamp": ..., "data": {...}}``."""
    event = entry.event.model_dump(mode="json")
    data = {k: v for k, v in event.items() if k not in {"type", "time"}}
    data["result"] = entry.result.model_dump(mode="json") if entry.result is not None else None
    if data["result"] is not None:  # a result stored by an older worker may still hold the token
        data["result"]["parameters"] = redact_parameters(data["result"]["parameters"])
    data["details"] = entry.details.model_dump(mode="json") if entry.details is not None else None
    payload = {"type": f"job.{entry.event.type.value}", "timestamp": event["time"], "data": data}
    return json.dumps(payload, separators=(",", ":")).encode()


# -- signing ------------------------------------------------------------------
def generate_secret() -> str:
    """A new signing secret, ``whsec_`` followed by 32 random bytes in base64."""
    return _SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def _key(secret: str) -> bytes:
    try:
        key = base64.b64decode(secret.removeprefix(_SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a webhook secret must be 'whsec_' + base64; make one with: darkroom webhooks secret") from None
    if not key:
        raise ValueError("the webhook secret is empty; make one with: darkroom webhooks secret")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes | str,
    *,
    tolerance_seconds: float = 300,
    now: float | None = None,
) -> None:
    """Check a received webhook; raise :class:`WebhookVerificationError` unless it is genuine and fresh.

    ``headers`` may use any case (a dict, or ``http.server``'s message object);
    ``body`` must be the raw bytes received, before any JSON parsing. A timestamp
    more than ``tolerance_seconds`` away from ``now`` (default: the clock) is
    refused, so a captured request cannot be replayed later.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    msg_id = _header(lowered, "webhook-id")
    timestamp = _timestamp(_header(lowered, "webhook-timestamp"), tolerance_seconds, now)
    raw = body.encode() if isinstance(body, str) else body
    try:
        expected = sign(secret, msg_id, timestamp, raw).removeprefix("v1,")
    except ValueError as exc:
        raise WebhookVerificationError(str(exc)) from None
    for candidate in _header(lowered, "webhook-signature").split():
        version, _, value = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(value.encode(), expected.encode()):
            return
    raise WebhookVerificationError(
        "no v1 signature in webhook-signature matches: wrong secret, or the body was altered"
    )


def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name)
    if not value:
        raise WebhookVerificationError(f"missing {name} header; not a Standard Webhooks request")
    return value


def _timestamp(value: str, tolerance_seconds: float, now: float | None) -> int:
    try:
        timestamp = int(value)
    except ValueError:
        raise WebhookVerificationError(f"webhook-timestamp {value!r} is not an integer of seconds") from None
    skew = (time.time() if now is None else now) - timestamp
    if skew > tolerance_seconds:
        raise WebhookVerificationError(
            f"webhook-timestamp {timestamp} is {skew:.0f} s old (tolerance {tolerance_seconds:g} s): "
            "a replayed or long-delayed request"
        )
    if -skew > tolerance_seconds:
        raise WebhookVerificationError(
            f"webhook-timestamp {timestamp} is {-skew:.0f} s in the future (tolerance {tolerance_seconds:g} s); "
            "check the sender's and the receiver's clocks"
        )
    return timestamp


# -- callback URL policy ------------------------------------------------------
_METADATA_HOSTS = frozenset(
    {"metadata.google.internal", "metadata.goog", "metadata", "instance-data", "instance-data.ec2.internal"}
)
_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200")
)
_PRIVATE_HINT = (
    "refused so that webhooks cannot reach internal services; use a public address, "
    "or set DARKROOM_ALLOW_PRIVATE_CALLBACKS=true on trusted networks"
)


@dataclass(frozen=True)
class CallbackTarget:
    """A checked callback URL: where to connect (``addresses``, all allowed) and what to ask for."""

    scheme: str
    host: str
    port: int
    target: str
    addresses: tuple[str, ...]


def check_callback_url(url: str, *, allow_private: bool, resolve: Resolver = socket.getaddrinfo) -> None:
    """Raise ``ValueError`` (saying why) unless ``url`` is an http(s) URL whose host resolves only to
    public addresses. ``allow_private`` admits loopback, private and link-local addresses; cloud
    metadata endpoints (169.254.169.254, fd00:ec2::254, metadata.google.internal...) are always refused.
    """
    resolve_callback(url, allow_private=allow_private, resolve=resolve)


def resolve_callback(url: str, *, allow_private: bool, resolve: Resolver = socket.getaddrinfo) -> CallbackTarget:
    """Check ``url`` as :func:`check_callback_url` does and return the addresses to connect to.

    Connecting to these addresses (not resolving the name again) keeps a DNS
    answer that changes between the check and the connection from getting through.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"scheme {parts.scheme!r} is not allowed; use an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in the URL (user:password@) are not sent; put a token in the path or query")
    host = parts.hostname
    if not host:
        raise ValueError("the URL has no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError("the URL's port is not a number in 0..65535") from None
    if host.rstrip(".") in _METADATA_HOSTS:
        raise ValueError(f"host {host!r} is a cloud metadata service; always refused")
    addresses = _addresses(host, port, resolve)
    for address in addresses:
        _check_address(host, address, allow_private)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return CallbackTarget(parts.scheme, host, port, target, tuple(str(a) for a in addresses))


def _addresses(host: str, port: int, resolve: Resolver) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = resolve(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise ValueError(f"host {host!r} does not resolve ({exc}); check the URL") from None
    found = list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos))
    if not found:
        raise ValueError(f"host {host!r} resolves to no address; check the URL")
    return found


def _check_address(host: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address, allow_private: bool) -> None:
    embedded = _embedded_ipv4(address)
    if embedded is not None:  # judged by the IPv4 address it carries
        _check_address(host, embedded, allow_private)
        return
    if address in _METADATA_ADDRESSES:
        raise ValueError(f"host {host!r} resolves to {address}, a cloud metadata address; always refused")
    kind = _kind(address)
    if kind is not None and not allow_private:
        raise ValueError(f"host {host!r} resolves to {address} ({kind}); {_PRIVATE_HINT}")


def _embedded_ipv4(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside an IPv4-mapped, 6to4 or Teredo IPv6 address, if any."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    return address.teredo[1] if address.teredo is not None else None


def _kind(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """What makes an address non-public (None when it is public)."""
    checks = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
        ("not globally routable", not address.is_global),
    )
    return next((name for name, hit in checks if hit), None)
