"""Producers as tenants, through real processes: signed submissions verified by a real `darkroom worker`,
refusals with a code and a message, nothing written or sent across the boundary, webhooks signed only as the
producer a worker verified, key rotation with overlap, and the `darkroom producers` commands.

The module runs on its own Redis database: a registered producer turns signing on for every job there.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pydantic import SecretStr

from darkroom.common.broker import task_message
from darkroom.common.cli import main
from darkroom.common.clients import make_redis
from darkroom.common.errors import ErrorCode, InvalidJobError, JobFailed
from darkroom.common.identity import AUTH_FIELD, sign_job
from darkroom.common.jobs import MESSAGE_SCHEMA_VERSION, validate_job
from darkroom.common.jobstore import stage_create
from darkroom.common.producers import ProducerPolicy, ProducerRegistry
from darkroom.common.queues import TASK_IMG2IMG
from darkroom.common.settings import Settings
from darkroom.common.storage import S3Uri
from darkroom.common.webhooks import WebhookVerificationError, generate_secret, verify
from darkroom.dev.demo import sample_image
from darkroom.producer.client import Client
from darkroom.producer.webhooks.dispatcher import Dispatcher, DispatcherSettings

from ..helpers import png_bytes
from .helpers import celery_sender, spawn_worker, wait_webhooks_settled
from .test_webhooks import Receiver, has, types

pytestmark = [pytest.mark.integration, pytest.mark.slow]

JOB = {"prompt": "a kite", "strength": 0.5, "num_inference_steps": 4, "seed": 1}
HOOK_SECRETS = {"team-a": generate_secret(), "team-b": generate_secret()}


def own_database(url: str, db: int) -> str:
    base, _, last = url.rpartition("/")
    return f"{base}/{db}" if last.isdigit() else f"{url.rstrip('/')}/{db}"


@pytest.fixture(scope="module")
def tenancy(services: Any, settings: Settings, tiny_model: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two registered producers, a worker and an in-process dispatcher, all on Redis database 7."""
    url = own_database(settings.redis_url.get_secret_value(), 7)
    base = settings.model_copy(update={"redis_url": SecretStr(url), "allow_private_callbacks": True})
    rdb = make_redis(base)
    rdb.flushdb()
    registry = ProducerRegistry(rdb)
    keys = {}
    for producer in ("team-a", "team-b"):
        entry, secret = registry.add(producer)
        keys[producer] = (entry.keys[0].key_id, secret)
    root = tmp_path_factory.mktemp("tenancy")
    worker = spawn_worker(services, settings, f"tenancy-{uuid.uuid4().hex[:6]}", "--model", f"tiny={tiny_model}",
                          state_dir=root / "state", DARKROOM_REDIS_URL=url, DARKROOM_CPU_THREADS="1",
                          DARKROOM_SIGNATURE_MAX_AGE_SECONDS="600")
    worker.start(timeout=120)
    hooks = DispatcherSettings.model_validate({**base.model_dump(), "webhook_secrets": HOOK_SECRETS,
                                              "webhook_poll_seconds": 0.05, "webhook_retry_schedule": [0, 0.2],
                                              "dispatcher_name": f"tenancy-{uuid.uuid4().hex[:6]}"})
    dispatcher = Dispatcher(hooks, make_redis(hooks)).start()
    receiver = Receiver()
    receiver.thread.start()
    try:
        yield {"settings": base, "redis": rdb, "registry": registry, "keys": keys, "worker": worker,
               "receiver": receiver, "url": url}
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
        dispatcher.stop(timeout=10)
        worker.stop()
        rdb.flushdb()
        rdb.close()


def client_for(tenancy: dict[str, Any], producer: str | None) -> Client:
    """A client signing as ``producer`` (None: unsigned)."""
    update: dict[str, Any] = {}
    if producer is not None:
        key_id, secret = tenancy["keys"][producer]
        update = {"producer_id": producer, "producer_key_id": key_id, "producer_key": SecretStr(secret)}
    return Client(tenancy["settings"].model_copy(update=update))


def new_id(client: Client) -> str:
    """A job id in the client's producer's namespace."""
    return f"{client.settings.producer_id}.{uuid.uuid4().hex}"


def image(client: Client) -> str:
    return client.upload(png_bytes(sample_image(64)), f"s3://darkroom/tenancy/{uuid.uuid4().hex}.png")


def send_signed(client: Client, fields: dict[str, Any], auth: dict[str, Any] | None, *,
                record: bool = True) -> str:
    """A record (unless ``record`` is False) and a broker message written past the SDK, carrying ``auth``."""
    job = validate_job({"model": "tiny", "image": image(client), "job_id": new_id(client),
                        "output_prefix": "s3://darkroom/outputs", **JOB, **fields})
    assert job.job_id is not None
    args = {**job.model_dump(mode="json"), "schema_version": MESSAGE_SCHEMA_VERSION,
            **({} if auth is None else {AUTH_FIELD: auth})}
    if record:
        message = task_message(TASK_IMG2IMG, job.job_id, [args], queue=client.fleet.queue_for("tiny"), priority=0,
                               sender="test")
        pipe = client.jobs.redis.pipeline(transaction=False)
        stage_create(pipe, job, 3600, enqueue=message, auth=auth)
        assert pipe.execute() == [1]
    else:
        celery_sender(client).send_task(TASK_IMG2IMG, args=[args], task_id=job.job_id,
                                        queue=client.fleet.queue_for("tiny"))
    return job.job_id


def signature(tenancy: dict[str, Any], producer: str, job: dict[str, Any], at: int | None = None) -> dict[str, Any]:
    key_id, secret = tenancy["keys"][producer]
    data = validate_job(job).model_dump(mode="json")
    return sign_job(data, producer, key_id, secret, at).model_dump()


def _list(client: Client, job_id: str) -> list[str]:
    """Every object under the job's output folder."""
    return [o.uri.key for o in client.store.list_objects(S3Uri.parse(f"s3://darkroom/outputs/{job_id}/", allow_empty_key=True))]


def refused(client: Client, job_id: str, code: ErrorCode = ErrorCode.UNAUTHENTICATED) -> str:
    with pytest.raises(JobFailed) as failure:
        client.wait(job_id, timeout=60)
    assert failure.value.code == code, failure.value.message
    record = client.status(job_id)
    assert record.attempt == 0 and record.producer is None  # never started, no producer credited
    assert _list(client, job_id) == []
    return failure.value.message


# -- identity ---------------------------------------------------------------------------
def test_a_signed_job_runs_and_its_record_names_the_verified_producer(tenancy: dict[str, Any]) -> None:
    with client_for(tenancy, "team-a") as client:
        result = client.submit({"model": "tiny", "image": image(client), **JOB}).wait(timeout=120)
        record = client.status(result.job_id)
    assert record.producer == "team-a" and record.auth is not None and record.auth["producer"] == "team-a"
    assert _list(client, result.job_id)


def test_an_unsigned_job_is_refused_once_producers_are_registered(tenancy: dict[str, Any]) -> None:
    with client_for(tenancy, None) as client:
        handle = client.submit({"model": "tiny", "image": image(client), **JOB})
        message = refused(client, handle.job_id)
    assert "not signed" in message and "DARKROOM_PRODUCER_KEY" in message
    assert tenancy["worker"].alive()


def test_a_record_changed_after_signing_is_refused(tenancy: dict[str, Any]) -> None:
    with client_for(tenancy, "team-a") as client:
        fields = {"job_id": new_id(client), "image": image(client), "model": "tiny",
                  "output_prefix": "s3://darkroom/outputs", **JOB}
        auth = signature(tenancy, "team-a", fields)
        # the signed job, then its output folder changed before it was written (a tampered record and message)
        job_id = send_signed(client, {**fields, "output_prefix": "s3://darkroom/elsewhere"}, auth)
        assert "does not match" in refused(client, job_id)


def test_a_job_claiming_another_producer_is_refused_and_that_producers_receiver_gets_nothing(
    tenancy: dict[str, Any],
) -> None:
    receiver: Receiver = tenancy["receiver"]
    b_url = receiver.url()  # team-b's receiver, verifying with team-b's secret
    # Given team-a's SDK: it refuses at once to submit as team-b
    with client_for(tenancy, "team-a") as client:
        with pytest.raises(InvalidJobError, match="signs as producer 'team-a'"):
            client.submit({"model": "tiny", "image": image(client), **JOB, "producer": "team-b",
                           "callback_url": b_url})
        # When team-a writes past its SDK a job naming team-b and team-b's receiver, signed with its own key
        fields = {"job_id": new_id(client), "image": image(client), "model": "tiny", "producer": "team-b",
                  "callback_url": b_url, "output_prefix": "s3://darkroom/outputs", **JOB}
        job_id = send_signed(client, fields, signature(tenancy, "team-a", fields))
        # Then the worker refuses it, naming both producers, and writes nothing
        assert "names producer 'team-b' but was signed by 'team-a'" in refused(client, job_id)
    # and once a genuine team-b job's webhooks have come through the same dispatcher, the spoof sent nothing
    with client_for(tenancy, "team-b") as b:
        genuine = b.submit({"model": "tiny", "image": image(b), **JOB, "callback_url": b_url})
        genuine.wait(timeout=120)
    # (webhooks arrive in any order: wait for the two named, then for the dispatcher to settle every entry for
    # the URL, the spoof's included, so that what the receiver has by then is all it will ever get)
    receiver.wait_for(b_url, has("job.queued", "job.succeeded"))
    wait_webhooks_settled(tenancy["redis"], b_url)
    got = receiver.requests(b_url)
    assert {json.loads(r.body)["data"]["job_id"] for r in got} == {genuine.job_id}
    assert "job.queued" in types(got)  # before any worker ran it: the dispatcher checked the record's signature
    for request in got:
        verify(HOOK_SECRETS["team-b"], request.headers, request.body)
        with pytest.raises(WebhookVerificationError):
            verify(HOOK_SECRETS["team-a"], request.headers, request.body)


def test_a_message_without_a_record_that_fails_verification_is_dead_lettered_and_takes_no_id(
    tenancy: dict[str, Any],
) -> None:
    with client_for(tenancy, "team-a") as client:
        unsigned = send_signed(client, {}, None, record=False)
        fields = {"job_id": new_id(client), "image": image(client), "model": "tiny",
                  "output_prefix": "s3://darkroom/outputs", **JOB}
        stale = send_signed(client, fields, signature(tenancy, "team-a", fields, int(time.time()) - 3600),
                            record=False)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            letters = [v for v in client.jobs.dead_letters().values() if unsigned in v["raw"] or stale in v["raw"]]
            if len(letters) == 2:
                break
            time.sleep(0.2)
        reasons = sorted(v["reason"] for v in letters)
        assert len(reasons) == 2, reasons
        assert any("not signed" in r for r in reasons) and any("s old; messages older than 600 s" in r
                                                                for r in reasons)
        assert client.jobs.get(unsigned) is None and client.jobs.get(stale) is None
        assert _list(client, unsigned) == [] and _list(client, stale) == []
        # and a fresh signed message without a record runs
        fresh = {**fields, "job_id": new_id(client)}
        ok = send_signed(client, fresh, signature(tenancy, "team-a", fresh), record=False)
        deadline = time.monotonic() + 120
        while (record := client.jobs.get(ok)) is None or not record.status.is_terminal:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert record.status.value == "succeeded" and record.producer == "team-a"


def test_a_rotated_key_keeps_working_for_the_overlap_then_is_refused(tenancy: dict[str, Any]) -> None:
    registry: ProducerRegistry = tenancy["registry"]
    registry.add("team-r")
    old_id, old_secret = registry.require("team-r").keys[0].key_id, registry.require("team-r").keys[0].secret
    tenancy["keys"]["team-r"] = (old_id, old_secret)
    # Given a rotation with an hour of overlap: the old key still signs jobs that run
    _, new = registry.rotate("team-r", overlap_seconds=3600)
    with client_for(tenancy, "team-r") as old_client:
        old_client.submit({"model": "tiny", "image": image(old_client), **JOB}).wait(timeout=120)
    tenancy["keys"]["team-r"] = (new.key_id, new.secret)
    with client_for(tenancy, "team-r") as new_client:
        new_client.submit({"model": "tiny", "image": image(new_client), **JOB}).wait(timeout=120)
    # When the next rotation leaves no overlap, the old key (and the one before) is refused
    registry.rotate("team-r", overlap_seconds=0)
    time.sleep(2.5)  # workers cache the registry for 2 s
    with client_for(tenancy, "team-r") as stale_client:
        handle = stale_client.submit({"model": "tiny", "image": image(stale_client), **JOB})
        assert "unknown or expired" in refused(stale_client, handle.job_id)


def test_the_producers_commands_add_list_rotate_and_remove(tenancy: dict[str, Any]) -> None:
    runner = CliRunner()
    env = {"DARKROOM_REDIS_URL": tenancy["url"], "DARKROOM_STATE_DIR": str(tenancy["settings"].state_dir)}
    name = f"cli-{uuid.uuid4().hex[:6]}"
    added = runner.invoke(main, ["producers", "add", name, "--model", "tiny", "--max-priority", "bulk"], env=env)
    assert added.exit_code == 0, added.output
    lines = dict(line.split("=", 1) for line in added.output.split())
    assert lines["DARKROOM_PRODUCER_ID"] == name and lines["DARKROOM_PRODUCER_KEY"].startswith("dk_")
    again = runner.invoke(main, ["producers", "add", name], env=env)
    assert again.exit_code != 0 and "exists already" in again.output
    listed = runner.invoke(main, ["producers", "list"], env=env)
    assert name in listed.output and lines["DARKROOM_PRODUCER_KEY_ID"] in listed.output
    assert lines["DARKROOM_PRODUCER_KEY"] not in listed.output  # keys are never listed
    rotated = runner.invoke(main, ["producers", "rotate", name, "--overlap", "60"], env=env)
    assert rotated.exit_code == 0 and lines["DARKROOM_PRODUCER_KEY"] not in rotated.output
    listed = runner.invoke(main, ["producers", "list", "--json"], env=env)
    (entry,) = [json.loads(line) for line in listed.output.splitlines() if json.loads(line)["id"] == name]
    assert len(entry["keys"]) == 2 and entry["keys"][0]["expires_at"] is not None
    assert entry["policy"] == {"models": ["tiny"], "max_priority": "bulk"}
    acl = runner.invoke(main, ["producers", "acl", name, "--password", "pw"], env=env)
    assert acl.exit_code == 0 and acl.output.startswith(f"ACL SETUSER darkroom-producer-{name} ")
    assert runner.invoke(main, ["producers", "remove", name], env=env).exit_code == 0
    assert name not in runner.invoke(main, ["producers", "list"], env=env).output


def test_a_policy_is_stored_per_producer(tenancy: dict[str, Any]) -> None:
    registry: ProducerRegistry = tenancy["registry"]
    name = f"pol-{uuid.uuid4().hex[:6]}"
    registry.add(name, ProducerPolicy(models=["tiny"]))
    assert registry.require(name).policy.models == ["tiny"]
    registry.remove(name)


# -- per-producer policy ------------------------------------------------------------------
@pytest.fixture(scope="module")
def limited(tenancy: dict[str, Any]) -> str:
    """team-p: reads only s3://darkroom/team-p, writes only under s3://darkroom/outputs/team-p, model tiny,
    bulk work only, at most 64 x 64 pixels x 4 steps per job."""
    policy = ProducerPolicy(read_prefixes=["s3://darkroom/team-p"], write_prefixes=["s3://darkroom/outputs/team-p"],
                            models=["tiny"], max_priority="bulk", max_job_cost=64 * 64 * 4)  # type: ignore[arg-type]
    entry, secret = tenancy["registry"].add("team-p", policy)
    tenancy["keys"]["team-p"] = (entry.keys[0].key_id, secret)
    time.sleep(2.5)  # workers cache the registry for 2 s
    return "team-p"


def own_input(client: Client) -> str:
    return client.upload(png_bytes(sample_image(64)), f"s3://darkroom/team-p/{uuid.uuid4().hex}.png")


ALLOWED = {"model": "tiny", "priority": "bulk", "resize_mode": "resize", "width": 64, "height": 64, "output_prefix": "s3://darkroom/outputs/team-p",
           **JOB}


def test_a_job_within_its_producers_policy_runs(tenancy: dict[str, Any], limited: str) -> None:
    with client_for(tenancy, limited) as client:
        result = client.submit({**ALLOWED, "image": own_input(client)}).wait(timeout=120)
    assert all(uri.startswith("s3://darkroom/outputs/team-p/") for uri in result.uris)


@pytest.mark.parametrize(("change", "field", "says"), [
    ({"image": "s3://darkroom/team-a/secret.png"}, "image", "may not read s3://darkroom/team-a/secret.png"),
    ({"output_prefix": "s3://darkroom/outputs/team-a"}, "output_prefix", "may not write to s3://darkroom/outputs/team-a"),
    ({"priority": "interactive"}, "priority", "only bulk work"),
    ({"num_inference_steps": 40}, "num_inference_steps", "over this producer's ceiling"),
    ({"width": None, "height": None, "resize_mode": None}, "num_inference_steps", "names no size"),
])
def test_the_sdk_and_the_worker_both_refuse_what_the_policy_does_not_allow(
    tenancy: dict[str, Any], limited: str, change: dict[str, Any], field: str, says: str,
) -> None:
    with client_for(tenancy, limited) as client:
        job = {**ALLOWED, "image": own_input(client), **change}
        job = {k: v for k, v in job.items() if v is not None}
        # the SDK refuses it at once, naming the field
        with pytest.raises(InvalidJobError) as early:
            client.submit(job)
        assert [e.field for e in early.value.errors] == [field] and says in str(early.value)
        # and written past the SDK, signed, the worker refuses it before reading or writing anything
        fields = {**job, "job_id": new_id(client)}
        job_id = send_signed(client, fields, signature(tenancy, limited, fields))
        message = refused(client, job_id, ErrorCode.NOT_PERMITTED)
    assert says in message and "team-p" in message
    assert _list(client, job_id) == [] and not list(client.store.list_objects(
        S3Uri.parse("s3://darkroom/outputs/team-a/" + job_id, allow_empty_key=True)))


def test_a_producer_reads_cancels_and_resubmits_only_its_own_jobs(tenancy: dict[str, Any]) -> None:
    from darkroom.common.errors import NotPermitted

    with client_for(tenancy, "team-a") as a, client_for(tenancy, "team-b") as b:
        handle = a.submit({"model": "tiny", "image": image(a), **JOB})
        for attempt in (lambda: b.status(handle.job_id), lambda: b.cancel(handle.job_id),
                        lambda: b.wait(handle.job_id, timeout=5)):
            with pytest.raises(NotPermitted, match="belongs to producer 'team-a'; producer 'team-b' may"):
                attempt()
        with pytest.raises(InvalidJobError, match="job ids start with 'team-b.'"):  # not in team-b's namespace
            b.submit({"model": "tiny", "image": image(b), **JOB, "job_id": handle.job_id}, resubmit=True)
        result = handle.wait(timeout=120)
        assert a.status(result.job_id).status.value == "succeeded"  # untouched by team-b's attempts


# -- quotas ---------------------------------------------------------------------------------
def test_quotas_refuse_with_quota_exceeded_and_say_when_to_retry(tenancy: dict[str, Any]) -> None:
    from darkroom.common.errors import NotPermitted
    from darkroom.common.fleet import Fleet

    registry: ProducerRegistry = tenancy["registry"]
    idle = f"idle{uuid.uuid4().hex[:6]}"  # in the catalog, served by no worker: its jobs stay in flight
    Fleet(tenancy["redis"]).register_models([idle])
    for name, policy in (("team-q", ProducerPolicy(max_in_flight=2)), ("team-m", ProducerPolicy(max_per_minute=3))):
        entry, secret = registry.add(name, policy)
        tenancy["keys"][name] = (entry.keys[0].key_id, secret)
    with client_for(tenancy, "team-q") as q:
        first = q.submit_many([{"model": idle, "image": "s3://darkroom/in/x.png", **JOB} for _ in range(2)])
        with pytest.raises(NotPermitted) as over:
            q.submit({"model": idle, "image": "s3://darkroom/in/x.png", **JOB})
        assert over.value.code == ErrorCode.QUOTA_EXCEEDED and over.value.retry_after
        assert "has 2 job(s) in flight; 1 more would pass its 2" in over.value.message
        q.cancel(first[0].job_id)  # one ends: room for one more
        q.submit({"model": idle, "image": "s3://darkroom/in/x.png", **JOB})
        for handle in first[1:]:
            q.cancel(handle.job_id)
    with client_for(tenancy, "team-m") as m:
        if time.time() % 60 > 50:  # a new minute between the submits would reset the count
            time.sleep(61 - time.time() % 60)
        m.submit_many([{"model": idle, "image": "s3://darkroom/in/x.png", **JOB} for _ in range(3)])
        with pytest.raises(NotPermitted) as fast:
            m.submit({"model": idle, "image": "s3://darkroom/in/x.png", **JOB})
        assert fast.value.code == ErrorCode.QUOTA_EXCEEDED and "3 per minute" in fast.value.message
        assert fast.value.retry_after is not None and 0 < fast.value.retry_after <= 60


# -- namespaces and the outbox ---------------------------------------------------------------
def test_a_job_id_outside_the_producers_namespace_is_refused(tenancy: dict[str, Any]) -> None:
    with client_for(tenancy, "team-a") as client:
        with pytest.raises(InvalidJobError, match="job ids start with 'team-a.'"):
            client.submit({"model": "tiny", "image": image(client), **JOB, "job_id": f"team-b.{uuid.uuid4().hex}"})
        assert client.prepare({"model": "tiny", "image": image(client), **JOB}).job_id.startswith("team-a.")
        fields = {"job_id": f"team-b.{uuid.uuid4().hex}", "image": image(client), "model": "tiny",
                  "output_prefix": "s3://darkroom/outputs", **JOB}
        job_id = send_signed(client, fields, signature(tenancy, "team-a", fields))
        message = refused(client, job_id, ErrorCode.NOT_PERMITTED)
    assert "outside producer 'team-a''s namespace" in message


def test_outbox_entries_written_past_the_lifecycle_get_nothing_signed_but_what_the_record_says(
    tenancy: dict[str, Any],
) -> None:
    from darkroom.common.events import EventType, JobEvent
    from darkroom.common.results import JobResult
    from darkroom.common.webhooks import OUTBOX_KEY, OutboxEntry

    receiver: Receiver = tenancy["receiver"]
    b_url = receiver.url()
    # Given a genuine team-b job that succeeded, with its webhooks delivered
    with client_for(tenancy, "team-b") as b:
        genuine = b.submit({"model": "tiny", "image": image(b), **JOB, "callback_url": b_url})
        result = genuine.wait(timeout=120)
    receiver.wait_for(b_url, has("job.succeeded"))
    wait_webhooks_settled(tenancy["redis"], b_url)  # queued and started too: they may arrive after succeeded
    before = len(receiver.requests(b_url))
    # When someone pushes entries straight into the shared outbox claiming team-b was verified: a fake result for
    # the genuine job, the same to another URL, and one for a job id outside team-b's namespace
    event = JobEvent(type=EventType.SUCCEEDED, job_id=genuine.job_id, status="succeeded",  # type: ignore[arg-type]
                     time=result.finished_at)
    fake = JobResult.model_validate({**result.model_dump(mode="json"), "outputs": []})
    spoof = receiver.url()
    entries = [OutboxEntry(id=f"msg_{uuid.uuid4().hex}", job_id=genuine.job_id, url=b_url, verified_producer="team-b",
                           terminal=True, event=event, result=fake),
               OutboxEntry(id=f"msg_{uuid.uuid4().hex}", job_id=genuine.job_id, url=spoof, verified_producer="team-b",
                           terminal=True, event=event, result=fake),
               OutboxEntry(id=f"msg_{uuid.uuid4().hex}", job_id=f"team-a.{uuid.uuid4().hex}", url=spoof,
                           verified_producer="team-b", terminal=True, event=event.model_copy(update={"job_id": "x"}))]
    for entry in entries:
        tenancy["redis"].lpush(OUTBOX_KEY, entry.model_dump_json())
    # Then team-b's receiver gets the record's true result (not the fake), and nothing goes anywhere else
    got = receiver.wait_for(b_url, lambda r: len(r) > before)
    wait_webhooks_settled(tenancy["redis"], b_url, spoof)
    (resent,) = receiver.requests(b_url)[before:]
    assert [o["uri"] for o in json.loads(resent.body)["data"]["result"]["outputs"]] == result.uris
    verify(HOOK_SECRETS["team-b"], resent.headers, resent.body)
    assert receiver.requests(spoof) == [] and got


def test_the_cli_says_no_for_another_producers_job(tenancy: dict[str, Any]) -> None:
    with client_for(tenancy, "team-a") as a:
        handle = a.submit({"model": "tiny", "image": image(a), **JOB})
        handle.wait(timeout=120)
    key_id, secret = tenancy["keys"]["team-b"]
    env = {"DARKROOM_REDIS_URL": tenancy["url"], "DARKROOM_STATE_DIR": str(tenancy["settings"].state_dir),
           "DARKROOM_PRODUCER_ID": "team-b", "DARKROOM_PRODUCER_KEY_ID": key_id, "DARKROOM_PRODUCER_KEY": secret}
    for command in (["status", handle.job_id], ["cancel", handle.job_id], ["wait", handle.job_id]):
        result = CliRunner().invoke(main, command, env=env)
        assert result.exit_code == 1 and "belongs to producer 'team-a'" in result.output, result.output


def test_the_async_client_signs_checks_its_policy_and_reads_only_its_own_jobs(tenancy: dict[str, Any],
                                                                               limited: str) -> None:
    import asyncio

    from darkroom.common.errors import NotPermitted
    from darkroom.producer.aio import AsyncClient

    key_id, secret = tenancy["keys"][limited]
    settings = tenancy["settings"].model_copy(update={"producer_id": limited, "producer_key_id": key_id,
                                                      "producer_key": SecretStr(secret)})
    with client_for(tenancy, limited) as sync:
        source = own_input(sync)
    with client_for(tenancy, "team-a") as a:
        foreign = a.submit({"model": "tiny", "image": image(a), **JOB})

    async def scenario() -> None:
        async with AsyncClient(settings) as client:
            handle = await client.submit({**ALLOWED, "image": source})
            assert handle.job_id.startswith(f"{limited}.")
            result = await handle.wait(timeout=120)
            assert (await client.status(result.job_id)).producer == limited
            with pytest.raises(InvalidJobError, match="only bulk work"):
                await client.submit({**ALLOWED, "image": source, "priority": "interactive"})
            with pytest.raises(NotPermitted, match="belongs to producer 'team-a'"):
                await client.status(foreign.job_id)

    asyncio.run(scenario())
