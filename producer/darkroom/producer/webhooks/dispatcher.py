"""The webhook dispatcher: delivers outbox entries to callback URLs, signed, retried, dead-lettered.

Runs as its own process (``darkroom dispatcher``), never on a GPU worker's time.
One loop takes entries (due retries first, then the outbox) and hands them to a
thread pool that makes the HTTP requests:

* terminal events (succeeded, failed, cancelled) follow ``webhook_retry_schedule``
  (by default about 27.6 hours in all) and then land in the dead-letter store;
* queued/started events get at most ``webhook_nonterminal_attempts`` tries;
* progress events are throttled per job and never retried.

Every attempt is signed afresh (new ``webhook-timestamp``) under the same
``webhook-id``, with the secret of the producer a worker *verified* for the job
(the entry's ``verified_producer``, from the record), never the job's ``producer``
field. Without a producer registry (one producer) an entry no worker verified is
signed as ``DARKROOM_PRODUCER_ID``; with one, an entry is sent only as its job's
record vouches for it (:meth:`Dispatcher.checked`: the producer a worker wrote there,
or the record's verified signature; a job refused as unauthenticated, or an entry
written past the lifecycle, is dropped). Redirects are not followed. The callback URL is checked again at
delivery (DNS may have changed) and the request goes to the address that was
checked. Secrets are never logged.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Protocol

import redis
from pydantic import Field, SecretStr, ValidationError, field_validator

from darkroom.common.errors import ConfigurationError
from darkroom.common.events import EventType
from darkroom.common.identity import Unauthenticated, verify_job
from darkroom.common.jobstore import JobRecord, UnreadableRecord, job_key
from darkroom.common.producers import ProducerRegistry, job_namespace
from darkroom.common.settings import Settings
from darkroom.common.status import JobStatus
from darkroom.common.webhooks import STATS_KEY, CallbackTarget, Resolver, resolve_callback, sign, webhook_body

from .deliveries import Attempt, Delivery, DeliveryQueue

__all__ = ["Dispatcher", "DispatcherSettings", "HttpSender", "Response", "Sender", "next_delay"]

log = logging.getLogger("darkroom.webhooks")

#: immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h: about 27.6 hours from first to last attempt
DEFAULT_SCHEDULE = [0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0]
HEARTBEAT_SECONDS = 5.0
USER_AGENT = "darkroom-webhooks/0.1"


class DispatcherSettings(Settings):
    """``DARKROOM_*`` settings of the webhook dispatcher (on top of the shared ones)."""

    webhook_secrets: dict[str, SecretStr] = Field(
        default_factory=dict,
        description='Signing secret per producer id, JSON: {"default": "whsec_..."} (never logged).',
    )
    webhook_retry_schedule: list[Annotated[float, Field(ge=0, allow_inf_nan=False)]] = Field(
        default_factory=lambda: list(DEFAULT_SCHEDULE), min_length=1,
        description="Seconds before each attempt at a terminal event, from the previous failure; starts with 0.",
    )
    webhook_nonterminal_attempts: int = Field(3, ge=1, description="Attempts at a queued/started event.")
    webhook_progress_interval_seconds: float = Field(
        2.0, ge=0, description="At most one progress webhook per job in this many seconds."
    )
    webhook_timeout_seconds: float = Field(10.0, gt=0, description="Connect and read timeout of one attempt.")
    webhook_concurrency: int = Field(8, ge=1, le=256, description="Deliveries in flight at once (threads).")
    webhook_poll_seconds: float = Field(1.0, gt=0, le=5, description="How often due retries are looked for.")
    dispatcher_name: str | None = Field(
        None, description="Unique among running dispatchers; defaults to webhooks-<host>-<pid>."
    )

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _first_is_immediate(cls, v: list[float]) -> list[float]:
        if v and v[0] != 0:
            raise ValueError(f"the first attempt is made at once; start the schedule with 0, not {v[0]}")
        return v


def next_delay(delivery: Delivery, schedule: list[float], nonterminal_attempts: int) -> float | None:
    """Seconds until the next attempt after a failed one, or None when there is none."""
    if delivery.event.type is EventType.PROGRESS:
        return None
    limit = len(schedule) if delivery.terminal else min(nonterminal_attempts, len(schedule))
    made = len(delivery.attempts)
    return schedule[made] if made < limit else None


# -- HTTP -----------------------------------------------------------------------
@dataclass(frozen=True)
class Response:
    """What a receiver answered: the status, a redirect target, the start of the body."""

    status: int
    location: str | None = None
    snippet: str = ""

    def describe(self) -> str:
        if 300 <= self.status < 400:
            return f"HTTP {self.status}: redirect to {self.location} not followed; point callback_url at it"
        return f"HTTP {self.status}" + (f": {self.snippet}" if self.snippet else "")


class Sender(Protocol):
    """Posts one signed body to a checked target; raises OSError or HTTPException when there is no answer."""

    def post(self, target: CallbackTarget, headers: Mapping[str, str], body: bytes, timeout: float) -> Response: ...


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to an address that was checked, while Host names the URL's host."""

    def __init__(self, host: str, port: int, *, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """As :class:`_PinnedHTTP`, with TLS verified against the URL's host name."""

    def __init__(self, host: str, port: int, *, address: str, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self.address = address
        self.tls = context

    def connect(self) -> None:
        raw = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self.tls.wrap_socket(raw, server_hostname=self.host)


class HttpSender:
    """Stdlib HTTP(S): one connection per attempt, no redirects, no proxies, at most 200 body bytes read."""

    def __init__(self) -> None:
        self.tls = ssl.create_default_context()

    def post(self, target: CallbackTarget, headers: Mapping[str, str], body: bytes, timeout: float) -> Response:
        conn: http.client.HTTPConnection
        if target.scheme == "https":
            conn = _PinnedHTTPS(target.host, target.port, address=target.addresses[0], timeout=timeout, context=self.tls)
        else:
            conn = _PinnedHTTP(target.host, target.port, address=target.addresses[0], timeout=timeout)
        try:
            conn.request("POST", target.target, body=body, headers=dict(headers))
            answer = conn.getresponse()
            snippet = answer.read(200).decode("utf-8", "replace")
            return Response(answer.status, answer.getheader("location"), " ".join(snippet.split()))
        finally:
            conn.close()


# -- the dispatcher -------------------------------------------------------------


class Dispatcher:
    """Delivers webhooks until :meth:`stop`. ``run`` blocks; ``start`` runs it on a thread."""

    def __init__(
        self,
        settings: DispatcherSettings,
        client: redis.Redis,
        *,
        sender: Sender | None = None,
        resolve: Resolver = socket.getaddrinfo,
    ) -> None:
        self.settings = settings
        self.name = settings.dispatcher_name or f"webhooks-{socket.gethostname()}-{os.getpid()}"
        self.queue = DeliveryQueue(client, self.name, dead_retention_seconds=settings.dead_letter_retention_seconds,
                                   dead_max=settings.dead_letter_max)
        self.sender = sender or HttpSender()
        self.resolve = resolve
        self.secrets = _checked_secrets(settings.webhook_secrets)
        self._stopping = threading.Event()
        self._slots = threading.BoundedSemaphore(settings.webhook_concurrency)
        self._thread: threading.Thread | None = None
        self._last_beat = 0.0
        self._registry = ProducerRegistry(client)
        self._signed_at = (-1e9, False)

    # -- running -------------------------------------------------------------
    def run(self) -> None:
        """Deliver until :meth:`stop`; then finish the deliveries in flight and give back the rest."""
        recovered = self.queue.recover()
        if recovered:
            log.info("took back %d webhook(s) left unsettled by a stopped dispatcher", recovered)
        self._beat()
        with ThreadPoolExecutor(self.settings.webhook_concurrency, thread_name_prefix="webhook") as pool:
            while not self._stopping.is_set():
                self._step(pool)
        self.queue.leave()

    def start(self) -> Dispatcher:
        """Run on a background thread (tests, embedding); stop with :meth:`stop`."""
        self._thread = threading.Thread(target=self.run, name=f"dispatcher-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Ask the loop to end; with a thread from :meth:`start`, wait up to ``timeout`` for it."""
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _step(self, pool: ThreadPoolExecutor) -> None:
        poll = self.settings.webhook_poll_seconds
        try:
            if time.monotonic() - self._last_beat >= HEARTBEAT_SECONDS:
                self._beat()
            raw = self._take(poll)
        except redis.RedisError as exc:
            log.warning("Redis unavailable (%s); trying again in %.1f s", exc, poll)
            self._stopping.wait(poll)
            return
        if raw is not None:
            pool.submit(self._settle_one, raw)

    def _take(self, poll: float) -> str | None:
        """The next entry (due retries first), holding a delivery slot for it; None after ``poll`` s."""
        if not self._slots.acquire(timeout=poll):
            return None
        raw = None
        try:
            raw = self.queue.take_due(time.time()) or self.queue.take(timeout=poll)
            return raw
        finally:
            if raw is None:
                self._slots.release()

    def _beat(self) -> None:
        self.queue.heartbeat(ttl_seconds=3 * HEARTBEAT_SECONDS)
        self._last_beat = time.monotonic()
        moved = self.queue.recover_dead()
        if moved:
            log.info("took back %d webhook(s) from a dispatcher that stopped beating", moved)

    # -- one entry -------------------------------------------------------------
    def _settle_one(self, raw: str) -> None:
        """Deliver one entry and record the outcome. Runs on a pool thread."""
        try:
            self.handle(raw)
        except redis.RedisError as exc:
            log.error("could not record a webhook outcome (%s); it is redelivered after a restart", exc)
        except Exception:  # a bug must not kill the pool thread silently
            log.exception("webhook delivery crashed; the entry stays unsettled until a dispatcher restarts")
        finally:
            self._slots.release()

    def handle(self, raw: str) -> None:
        """Attempt one taken entry and settle it: delivered, rescheduled, dead-lettered or dropped."""
        try:
            delivery = Delivery.model_validate_json(raw)
        except ValidationError as exc:
            log.error("dropping an unreadable outbox entry: %s", exc.errors(include_input=False))
            self.queue.finish(raw)
            return
        if self._throttled(delivery):
            self.queue.finish(raw)
            return
        checked = self.checked(delivery)
        if checked is None:
            self._count("unverified")
            self.queue.finish(raw)
            log.warning("dropped %s of %s: its producer is not verified by the job's record (it is not signed for "
                        "anyone)", delivery.event.type.value, delivery.job_id)
            return
        delivery = checked
        delivery = delivery.with_attempt(self.attempt(delivery))
        self._settle(raw, delivery)

    def _throttled(self, delivery: Delivery) -> bool:
        interval = self.settings.webhook_progress_interval_seconds
        if delivery.event.type is not EventType.PROGRESS or interval <= 0:
            return False
        return not self.queue.throttle(delivery.job_id, interval)

    def attempt(self, delivery: Delivery) -> Attempt:
        """One signed POST of ``delivery``; never raises for a receiver's failure."""
        at, started = datetime.now(UTC), time.monotonic()
        try:
            target = resolve_callback(
                delivery.url, allow_private=self.settings.allow_private_callbacks, resolve=self.resolve
            )
            body = webhook_body(delivery)
            response = self.sender.post(target, self.headers(delivery, body), body, self.settings.webhook_timeout_seconds)
        except ValueError as exc:  # refused URL, unresolvable host, missing secret: the message says it
            return Attempt(at=at, error=str(exc), seconds=time.monotonic() - started)
        except (OSError, http.client.HTTPException) as exc:  # no answer: refused, reset, timed out, TLS
            return Attempt(at=at, error=f"{type(exc).__name__}: {exc}", seconds=time.monotonic() - started)
        error = None if 200 <= response.status < 300 else response.describe()
        return Attempt(at=at, status=response.status, error=error, seconds=time.monotonic() - started)

    def checked(self, delivery: Delivery) -> Delivery | None:
        """With a producer registry, the entry as its job's record vouches for it, or None (drop it unsent).

        The outbox is a shared list, so an entry proves nothing: it must name the producer a worker verified
        (or, before any worker did, the record's signature must verify, as a worker checks it), whose namespace
        holds the job id (a producer's Redis user can write only there), and the URL that record's job names;
        a terminal event must match the record's status and carries the record's result and failure details,
        not the entry's.
        """
        if not self._signing_required():
            return delivery
        raw = self.queue.redis.get(job_key(delivery.job_id))
        try:
            record = None if raw is None else JobRecord.read(raw)
        except UnreadableRecord:
            return None
        producer = delivery.verified_producer or self._signer(raw)  # not started yet: the record's signature
        if record is None or producer is None or record.producer not in (None, producer) or record.job is None \
                or record.job.callback_url != delivery.url or not delivery.job_id.startswith(job_namespace(producer)):
            return None
        if record.producer is None and delivery.verified_producer is not None:
            return None  # an entry claiming a verification the record does not show
        delivery = delivery.model_copy(update={"verified_producer": producer})
        if not delivery.terminal:
            return delivery
        if delivery.event.status is not record.status:
            return None
        return delivery.model_copy(update={
            "event": record.as_event(delivery.event.type, time=delivery.event.time),
            "result": record.result if record.status is JobStatus.SUCCEEDED else None,
            "details": record.details if record.status is JobStatus.FAILED else None})

    def _signer(self, raw: bytes | str | None) -> str | None:
        """The producer whose registered key signed the stored record's job (as a worker checks it), or None."""
        try:
            stored = json.loads(raw or b"null")
            job, auth = stored["job"], stored.get("auth")
            return verify_job(job, auth, self._registry.get, now=time.time(), max_age=None).id
        except (Unauthenticated, ValueError, TypeError, KeyError):
            return None

    def _signing_required(self) -> bool:
        """Whether producers must be verified: a registry exists (checked at most every 2 s) or it is required."""
        if self.settings.require_signed_jobs:
            return True
        at, found = self._signed_at
        if time.monotonic() - at > 2.0:
            found = self._registry.in_use()
            self._signed_at = (time.monotonic(), found)
        return found

    def headers(self, delivery: Delivery, body: bytes) -> dict[str, str]:
        """The Standard Webhooks headers for one attempt, signed with the secret of the producer a worker verified
        (without a registry, of ``DARKROOM_PRODUCER_ID``); the job's own ``producer`` field chooses nothing."""
        producer = delivery.verified_producer or self.settings.producer_id
        secret = self.secrets.get(producer)
        if secret is None:
            raise ValueError(f"no signing secret for producer {producer!r}; add it to DARKROOM_WEBHOOK_SECRETS")
        timestamp = int(time.time())
        return {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": delivery.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, delivery.id, timestamp, body),
        }

    def _count(self, outcome: str) -> None:
        """Fleet-wide delivery counters (``darkroom:webhooks:stats``; workers export them on /metrics)."""
        try:
            self.queue.redis.hincrby(STATS_KEY, outcome, 1)
        except redis.RedisError as exc:
            log.debug("webhook stats not updated: %s", exc)

    def _settle(self, raw: str, delivery: Delivery) -> None:
        self._count(_outcome_name(delivery, self.settings))
        last = delivery.attempts[-1]
        where = f"{delivery.event.type.value} of {delivery.job_id} to {_redact(delivery.url)}"
        if last.ok:
            self.queue.finish(raw)
            log.info("delivered %s (%s, attempt %d)", where, delivery.id, len(delivery.attempts))
            return
        delay = next_delay(delivery, self.settings.webhook_retry_schedule, self.settings.webhook_nonterminal_attempts)
        if delay is not None:
            self.queue.retry(raw, delivery, time.time() + delay)
            log.warning("attempt %d of %s failed (%s); next in %g s", len(delivery.attempts), where,
                        last.describe(), delay)
        elif delivery.terminal:
            self.queue.bury(raw, delivery)
            log.error("gave up on %s after %d attempts (%s); see: darkroom webhooks list-failed", where,
                      len(delivery.attempts), last.describe())
        else:
            self.queue.finish(raw)
            log.log(logging.DEBUG if delivery.event.type is EventType.PROGRESS else logging.WARNING,
                    "dropped %s after %d attempt(s) (%s)", where, len(delivery.attempts), last.describe())


def _checked_secrets(secrets: Mapping[str, SecretStr]) -> dict[str, str]:
    """The secrets as strings, each checked to be ``whsec_`` + base64 (errors never show the value)."""
    if not secrets:
        raise ConfigurationError(
            'no webhook signing secrets: set DARKROOM_WEBHOOK_SECRETS=\'{"<producer id>": "whsec_..."}\' '
            "(make a secret with: darkroom webhooks secret)"
        )
    out = {}
    for producer, secret in secrets.items():
        try:
            sign(secret.get_secret_value(), "msg_check", 0, b"")
        except ValueError:
            raise ConfigurationError(
                f"DARKROOM_WEBHOOK_SECRETS[{producer!r}] is not 'whsec_' + base64; "
                "make one with: darkroom webhooks secret"
            ) from None
        out[producer] = secret.get_secret_value()
    return out


def _outcome_name(delivery: Delivery, settings: DispatcherSettings) -> str:
    if delivery.attempts[-1].ok:
        return "delivered"
    delay = next_delay(delivery, settings.webhook_retry_schedule, settings.webhook_nonterminal_attempts)
    if delay is not None:
        return "retried"
    return "dead_lettered" if delivery.terminal else "dropped"


def _redact(url: str) -> str:
    """The URL without its query string (which often carries a token) for logs."""
    return url.split("?", 1)[0]
