"""Webhooks on real services: jobs on the real worker, a real `darkroom dispatcher` process, a real
HTTP receiver on 127.0.0.1 that records every request and answers as each test scripts it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from darkroom.common.cli import main
from darkroom.common.clients import make_redis
from darkroom.common.errors import InvalidJobError
from darkroom.common.events import EventType, JobEvent
from darkroom.common.jobs import Img2ImgJob
from darkroom.common.lifecycle import Lifecycle
from darkroom.common.settings import Settings
from darkroom.common.status import JobStatus
from darkroom.common.webhooks import OutboxEntry, WebhookVerificationError, generate_secret, verify
from darkroom.dev.demo import sample_image
from darkroom.dev.process import WorkerProcess
from darkroom.producer.client import Client
from darkroom.producer.webhooks.deliveries import DEAD_KEY, RETRIES_KEY, DeadLetters, DeliveryQueue, processing_key
from darkroom.producer.webhooks.dispatcher import Dispatcher, DispatcherSettings

from ..helpers import png_bytes
from .helpers import wait_webhooks_settled

pytestmark = pytest.mark.integration

PRODUCER, OTHER = "webhook-test", "webhook-other"
SECRETS = {PRODUCER: generate_secret(), OTHER: generate_secret()}
SCHEDULE = [0, 0.2, 0.2, 0.2]
JOB = {"model": "tiny", "prompt": "a lighthouse", "strength": 0.5, "num_inference_steps": 4, "seed": 1}


# -- the receiver -----------------------------------------------------------------
@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int
    at: float

    @property
    def payload(self) -> Any:
        return json.loads(self.body)

    @property
    def type(self) -> str:
        return str(self.payload["type"])


class Receiver:
    """A ThreadingHTTPServer on 127.0.0.1; answers 200 unless a path was scripted with other statuses."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.scripts: dict[str, list[int]] = {}
        self.received: list[Received] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver.lock:
                    script = receiver.scripts.get(self.path, [])
                    status = script.pop(0) if script else 200
                    receiver.received.append(
                        Received(self.path, dict(self.headers.items()), body, status, time.monotonic())
                    )
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def url(self, statuses: list[int] | None = None) -> str:
        """A fresh path on this receiver, answering ``statuses`` first (then 200)."""
        path = f"/hooks/{uuid.uuid4().hex}"
        with self.lock:
            self.scripts[path] = list(statuses or [])
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def requests(self, url: str) -> list[Received]:
        path = url.split(str(self.server.server_port), 1)[1]
        with self.lock:
            return [r for r in self.received if r.path == path]

    def wait_for(self, url: str, done: Callable[[list[Received]], bool], timeout: float = 20) -> list[Received]:
        deadline = time.monotonic() + timeout
        while not done(got := self.requests(url)):
            if time.monotonic() > deadline:
                raise AssertionError(f"receiver got {[r.type for r in got]} at {url} within {timeout} s")
            time.sleep(0.05)
        return got


def types(requests: list[Received]) -> list[str]:
    return [r.type for r in requests]


def has(*wanted: str) -> Callable[[list[Received]], bool]:
    return lambda got: set(wanted) <= set(types(got))


# -- fixtures -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    rx = Receiver()
    rx.thread.start()
    try:
        yield rx
    finally:
        rx.server.shutdown()
        rx.server.server_close()


@pytest.fixture(scope="module")
def hook_settings(settings: Settings) -> Settings:
    """The session settings, admitting callbacks on 127.0.0.1 and naming this producer."""
    return settings.model_copy(update={"allow_private_callbacks": True, "producer_id": PRODUCER})


@pytest.fixture()
def hooks_client(hook_settings: Settings) -> Iterator[Client]:
    with Client(hook_settings) as c:
        yield c


@pytest.fixture(scope="module")
def rdb(settings: Settings) -> Iterator[redis.Redis]:
    client = make_redis(settings)
    yield client
    client.close()


def dispatcher_env(services: object, settings: Settings) -> dict[str, str]:
    return {
        **services.as_env(),  # type: ignore[attr-defined]
        "DARKROOM_STATE_DIR": str(settings.state_dir),
        "DARKROOM_WEBHOOK_SECRETS": json.dumps(SECRETS),
        "DARKROOM_PRODUCER_ID": PRODUCER,  # one producer (no registry): every webhook is signed as this one
        "DARKROOM_WEBHOOK_RETRY_SCHEDULE": json.dumps(SCHEDULE),
        "DARKROOM_WEBHOOK_POLL_SECONDS": "0.05",
        # one progress webhook per job per 30 s: the throttling test reports five in a row, and the dispatcher may
        # take a few seconds over them on a busy machine (no test here needs more than one progress webhook per job)
        "DARKROOM_WEBHOOK_PROGRESS_INTERVAL_SECONDS": "30",
        "DARKROOM_ALLOW_PRIVATE_CALLBACKS": "true",
    }


@pytest.fixture(scope="module")
def dispatcher(services: object, settings: Settings, rdb: redis.Redis) -> Iterator[subprocess.Popen[bytes]]:
    """A real `darkroom dispatcher` process; stopped with SIGTERM, which must end it cleanly."""
    name = f"test-dispatcher-{uuid.uuid4().hex[:6]}"
    log_path = Path(settings.state_dir) / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "darkroom.worker", "dispatcher", "--name", name],
            env={**os.environ, **dispatcher_env(services, settings)}, stdout=log, stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while not rdb.exists(f"darkroom:webhooks:dispatcher:{name}"):
        assert proc.poll() is None, f"dispatcher exited with {proc.returncode}:\n{log_path.read_text()}"
        assert time.monotonic() < deadline, f"dispatcher not ready after 30 s:\n{log_path.read_text()}"
        time.sleep(0.05)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
        log_text = log_path.read_text()
        assert code == 0, log_text
        assert f"dispatcher {name} stopped" in log_text
        assert not any(secret in log_text for secret in SECRETS.values()), "a secret reached the log"


def upload_input(client: Client) -> str:
    return client.upload(png_bytes(sample_image(64)), f"s3://darkroom/inputs/{uuid.uuid4().hex}.png")


def assert_signed(requests: list[Received], secret: str) -> None:
    for request in requests:
        verify(secret, request.headers, request.body)


# -- the tests ------------------------------------------------------------------------
def test_every_lifecycle_event_arrives_signed(
    hooks_client: Client, worker: WorkerProcess, receiver: Receiver, dispatcher: object
) -> None:
    # Given a job with a callback on a real receiver, asking for every event (progress is sent only when listed)
    url = receiver.url()
    handle = hooks_client.submit({**JOB, "image": upload_input(hooks_client), "callback_url": url,
                                  "webhook_events": ["queued", "started", "progress", "succeeded"]})
    # When it runs on the real worker
    result = handle.wait(timeout=60)
    got = receiver.wait_for(url, has("job.queued", "job.started", "job.progress", "job.succeeded"))
    # Then every lifecycle event arrived, each with a valid signature and its own webhook-id
    assert_signed(got, SECRETS[PRODUCER])
    assert len({r.headers["webhook-id"] for r in got}) == len(got)
    by_type = {r.type: r.payload for r in got}
    assert {p["data"]["job_id"] for p in by_type.values()} == {handle.job_id}
    assert by_type["job.progress"]["data"]["step"] >= 1 and by_type["job.progress"]["data"]["total_steps"] >= 1
    succeeded = by_type["job.succeeded"]["data"]
    assert succeeded["status"] == "succeeded"
    assert [o["uri"] for o in succeeded["result"]["outputs"]] == result.uris
    safety = result.outputs[0].safety  # the outputs' safety verdicts travel with the result
    assert safety is not None and succeeded["result"]["outputs"][0]["safety"] == safety.model_dump(mode="json")
    # ...and a receiver holding another secret, or checking much later, refuses them
    # (events may arrive in any order, so the tampered one is picked by type, not by position)
    queued = next(r for r in got if r.type == "job.queued")
    with pytest.raises(WebhookVerificationError):
        verify(SECRETS[OTHER], queued.headers, queued.body)
    with pytest.raises(WebhookVerificationError, match="old"):
        verify(SECRETS[PRODUCER], queued.headers, queued.body, now=time.time() + 3600)
    tampered = queued.body.replace(b'"job.queued"', b'"job.succeeded"')
    assert tampered != queued.body
    with pytest.raises(WebhookVerificationError):
        verify(SECRETS[PRODUCER], queued.headers, tampered)


def test_terminal_event_arrives_on_the_fourth_try_after_three_500s(
    hooks_client: Client, worker: WorkerProcess, receiver: Receiver, dispatcher: object, rdb: redis.Redis
) -> None:
    # Given a receiver that answers 500 three times, then 200
    stats_before = {k.decode(): int(v) for k, v in rdb.hgetall("darkroom:webhooks:stats").items()}
    url = receiver.url([500, 500, 500])
    handle = hooks_client.submit(
        {**JOB, "image": upload_input(hooks_client), "callback_url": url, "webhook_events": ["succeeded"]}
    )
    handle.wait(timeout=60)
    # Then the terminal event arrives four times: same webhook-id, fresh signatures, on the schedule
    got = receiver.wait_for(url, lambda got: len(got) >= 4)
    assert [r.answered for r in got] == [500, 500, 500, 200]
    assert types(got) == ["job.succeeded"] * 4
    assert len({r.headers["webhook-id"] for r in got}) == 1
    assert_signed(got, SECRETS[PRODUCER])
    gaps = [b.at - a.at for a, b in zip(got, got[1:], strict=False)]
    assert all(gap >= 0.15 for gap in gaps), gaps
    # ...and nothing is left to retry or dead-lettered
    webhook_id = got[0].headers["webhook-id"]
    wait_webhooks_settled(rdb, url)
    assert len(receiver.requests(url)) == 4
    assert not rdb.hexists(DEAD_KEY, webhook_id)
    assert not any(webhook_id in m.decode() for m in rdb.zrange(RETRIES_KEY, 0, -1))
    # ...and the fleet-wide outcome counters (exported on workers' /metrics) saw 3 retries and 1 delivery
    stats = {k.decode(): int(v) for k, v in rdb.hgetall("darkroom:webhooks:stats").items()}
    assert stats.get("retried", 0) - stats_before.get("retried", 0) >= 3
    assert stats.get("delivered", 0) - stats_before.get("delivered", 0) >= 1


def test_an_exhausted_schedule_dead_letters_and_replay_resends(
    hooks_client: Client, worker: WorkerProcess, receiver: Receiver, dispatcher: object,
    rdb: redis.Redis, services: object, settings: Settings,
) -> None:
    # Given a receiver that fails every attempt of the schedule, and a job that fails (missing input)
    url = receiver.url([500] * len(SCHEDULE) + [503])
    image = f"s3://darkroom/inputs/missing-{uuid.uuid4().hex}.png"
    handle = hooks_client.submit({**JOB, "image": image, "callback_url": url, "webhook_events": ["failed"]})
    with pytest.raises(Exception, match="input_not_found"):
        handle.wait(timeout=60)
    got = receiver.wait_for(url, lambda got: len(got) >= len(SCHEDULE))
    webhook_id = got[0].headers["webhook-id"]
    dead = DeadLetters(rdb)
    deadline = time.monotonic() + 10
    while (letter := dead.get(webhook_id)) is None:
        assert time.monotonic() < deadline, "no dead letter"
        time.sleep(0.05)
    # Then the dead letter keeps every attempt, and the CLI lists it
    assert [a.status for a in letter.attempts] == [500] * len(SCHEDULE)
    assert letter.event.error_code == "input_not_found" and letter.job_id == handle.job_id
    env = {**services.as_env(), "DARKROOM_STATE_DIR": str(settings.state_dir)}  # type: ignore[attr-defined]
    runner = CliRunner()
    listed = runner.invoke(main, ["webhooks", "list-failed"], env=env)
    assert listed.exit_code == 0, listed.output
    assert webhook_id in listed.output and "HTTP 500" in listed.output and "failed" in listed.output
    as_json = json.loads(runner.invoke(main, ["webhooks", "list-failed", "--json"], env=env).output)
    assert webhook_id in {d["id"] for d in as_json}
    # When it is replayed (the receiver answers 503 once more, then 200)
    replayed = runner.invoke(main, ["webhooks", "replay", webhook_id], env=env)
    assert replayed.exit_code == 0 and "queued 1" in replayed.output
    # Then the same webhook arrives again, with the same id, and leaves the dead-letter store
    again = receiver.wait_for(url, lambda got: len(got) >= len(SCHEDULE) + 2)
    assert [r.answered for r in again[len(SCHEDULE):]] == [503, 200]
    assert {r.headers["webhook-id"] for r in again} == {webhook_id}
    assert_signed(again, SECRETS[PRODUCER])
    assert dead.get(webhook_id) is None
    missing = runner.invoke(main, ["webhooks", "replay", webhook_id], env=env)
    assert missing.exit_code != 0 and "not in the dead-letter store" in missing.output


def test_webhook_events_choose_what_is_sent(
    hooks_client: Client, worker: WorkerProcess, receiver: Receiver, dispatcher: object, rdb: redis.Redis
) -> None:
    url = receiver.url()
    handle = hooks_client.submit(
        {**JOB, "image": upload_input(hooks_client), "callback_url": url, "webhook_events": ["started", "succeeded"]}
    )
    handle.wait(timeout=60)
    receiver.wait_for(url, has("job.started", "job.succeeded"))
    wait_webhooks_settled(rdb, url)
    assert sorted(types(receiver.requests(url))) == ["job.started", "job.succeeded"]


def test_progress_is_throttled_and_a_jobs_producer_field_chooses_no_secret(
    hooks_client: Client, receiver: Receiver, dispatcher: object, rdb: redis.Redis
) -> None:
    # Given a job naming another producer, in a fleet with no producer registry (one producer; no worker needed:
    # the status store drives webhooks)
    url = receiver.url()
    job = hooks_client.prepare({**JOB, "image": "s3://darkroom/inputs/x.png", "callback_url": url, "producer": OTHER,
                                "webhook_events": ["queued", "started", "progress", "cancelled"]})
    assert job.job_id is not None
    hooks_client.jobs.create(job)
    # When it starts, reports progress five times in a row, then is cancelled
    lifecycle = Lifecycle(hooks_client.jobs.redis)
    started = lifecycle.start(job.job_id, None, worker="test", lease_seconds=30, max_lost=5)
    assert started.record is not None and started.fence is not None
    for step in range(1, 6):
        lifecycle.report_progress(started.fence, started.record, step, 5)
    lifecycle.cancel(job.job_id)
    got = receiver.wait_for(url, has("job.cancelled"))
    wait_webhooks_settled(rdb, url)
    # Then one progress event got through, and everything is signed as the deployment's producer, never as the
    # one the job named (with a registry, as the producer a worker verified: tests/integration/test_producers.py)
    assert sorted(types(receiver.requests(url))) == ["job.cancelled", "job.progress", "job.queued", "job.started"]
    assert_signed(got, SECRETS[PRODUCER])
    with pytest.raises(WebhookVerificationError):
        assert_signed(got, SECRETS[OTHER])


def test_entries_of_a_crashed_dispatcher_are_delivered_by_the_next(
    hook_settings: Settings, receiver: Receiver, rdb: redis.Redis
) -> None:
    # Given an entry left in the processing list of a dispatcher that died (no heartbeat)
    url = receiver.url()
    event = JobEvent(type=EventType.QUEUED, job_id="orphan", status=JobStatus.QUEUED, time=datetime.now(UTC))
    entry = OutboxEntry(id=f"msg_{uuid.uuid4().hex}", job_id="orphan", url=url, producer=PRODUCER,
                        terminal=False, event=event)
    ghost = f"ghost-{uuid.uuid4().hex[:6]}"
    rdb.lpush(processing_key(ghost), entry.model_dump_json())
    rdb.sadd("darkroom:webhooks:dispatchers", ghost)
    # When a dispatcher starts (in-process here)
    settings = DispatcherSettings.model_validate(
        {**hook_settings.model_dump(), "webhook_secrets": SECRETS, "webhook_poll_seconds": 0.05,
         "dispatcher_name": f"rescuer-{ghost}"}
    )
    rescuer = Dispatcher(settings, make_redis(settings)).start()
    try:
        got = receiver.wait_for(url, has("job.queued"), timeout=10)
    finally:
        rescuer.stop(timeout=10)
    # Then it delivered the orphan and cleaned up after the dead one and itself
    assert_signed(got, SECRETS[PRODUCER])
    assert rdb.llen(processing_key(ghost)) == 0
    assert not rdb.sismember("darkroom:webhooks:dispatchers", ghost)
    assert not rdb.sismember("darkroom:webhooks:dispatchers", settings.dispatcher_name)


def test_a_heartbeat_takes_back_only_the_entries_of_dead_dispatchers(rdb: redis.Redis) -> None:
    # Given a live dispatcher with an entry in flight, and a dead one with an entry left over
    live, dead = DeliveryQueue(rdb, f"live-{uuid.uuid4().hex[:6]}"), f"dead-{uuid.uuid4().hex[:6]}"
    live.heartbeat(ttl_seconds=15)
    rdb.lpush(live.processing, "in flight")
    rdb.sadd("darkroom:webhooks:dispatchers", dead)
    try:
        # When any dispatcher's heartbeat looks for orphans
        DeliveryQueue(rdb, "observer").recover_dead()
        live.recover_dead()
        # Then the live one keeps its entry in flight (the dead one, holding nothing, is forgotten)
        assert rdb.lrange(live.processing, 0, -1) == [b"in flight"]
        assert not rdb.sismember("darkroom:webhooks:dispatchers", dead)
    finally:
        rdb.delete(live.processing)
        live.leave()


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:9/hook", "loopback"),
        ("http://10.20.30.40/hook", "private"),
        ("http://169.254.169.254/latest/meta-data/", "metadata"),
        ("http://localhost:8080/hook", "loopback"),
    ],
)
def test_private_callbacks_are_refused_at_submit(client: Client, url: str, reason: str) -> None:
    # Given the default settings (private callbacks not allowed)
    job_id = f"private-{uuid.uuid4().hex}"
    with pytest.raises(InvalidJobError) as refused:
        client.submit({**JOB, "job_id": job_id, "image": "s3://darkroom/inputs/x.png", "callback_url": url})
    # Then the refusal names the field and the reason, and nothing was queued
    (error,) = refused.value.errors
    assert error.field == "callback_url" and error.value == url and reason in error.message
    assert client.jobs.get(job_id) is None


def test_submit_fills_the_producer_id(hooks_client: Client) -> None:
    assert hooks_client.prepare({**JOB, "image": "s3://darkroom/inputs/x.png"}).producer == PRODUCER
    job = Img2ImgJob(**JOB, image="s3://darkroom/inputs/x.png", producer="mine")
    assert hooks_client.prepare(job).producer == "mine"
