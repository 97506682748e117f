"""The fenced lifecycle on real services: zombies, stale cancels, reruns, counters, tolerant records,
lost messages, durable Redis and messages from producers other than the SDK.

Workers serve a model id of their own (see helpers.Pool), with fault injection and short leases.
"""

from __future__ import annotations

import hashlib
import json
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from darkroom.common.errors import ErrorCode, JobFailed
from darkroom.common.jobstore import DEAD_LETTERS_KEY, JobStore, cancel_key, job_key
from darkroom.common.queues import TASK_IMG2IMG
from darkroom.common.status import JobStatus
from darkroom.common.storage import S3Uri
from darkroom.dev.demo import sample_image
from darkroom.dev.embedded import EmbeddedServices
from darkroom.producer.client import Client

from ..helpers import png_bytes
from .helpers import Pool, celery_sender, events, submit, wait_for_record, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def published_images_match(client: Client, job_id: str) -> dict[str, Any]:
    """result.json (found from the job id alone) names images whose bytes have the recorded sha256."""
    record = client.status(job_id)
    assert record.result is not None
    raw = client.download(record.result.result_uri)
    result = json.loads(raw)
    for output in result["outputs"]:
        data = client.download(output["uri"])
        assert hashlib.sha256(data).hexdigest() == output["sha256"], output["uri"]
    return result


def test_a_paused_worker_resumes_after_a_takeover_and_publishes_nothing(client: Client, pool: Pool) -> None:
    # given worker A running a long job
    zombie = pool.start()
    handle = submit(client, pool, "a long boat", steps=400)
    wait_until(lambda: client.jobs.progress(handle.job_id) is not None, what="the job's first step")
    assert zombie.proc is not None
    # when A is paused for well over its lease (2 s) and B takes the job over
    zombie.proc.send_signal(signal.SIGSTOP)
    try:
        rescuer = pool.start()
        wait_until(lambda: client.status(handle.job_id).attempt == 2, timeout=60, what="the takeover")
    finally:
        zombie.proc.send_signal(signal.SIGCONT)  # A wakes up mid-job, its fence stale
    result = handle.wait(timeout=180)
    # then the job succeeded once, by B's attempt, and A wrote nothing
    assert result.attempt == 2 and result.worker == rescuer.name
    published = published_images_match(client, handle.job_id)
    assert published["attempt"] == 2
    history = events(client, handle)
    assert history.count("finished") == 1 and history.count("started") == 2
    wait_until(lambda: "writes nothing" in zombie.tail(400), timeout=60, what="A to notice its stale fence")
    prefix = S3Uri.parse(result.result_uri).key.rsplit("/", 1)[0]
    listing = client.store.client.list_objects_v2(Bucket="darkroom", Prefix=prefix + "/")
    runs = {k["Key"][len(prefix) + 1:].split("/")[0] for k in listing.get("Contents", [])} - {"result.json"}
    assert runs == {f"{result.submission}-2"}, runs  # nothing under attempt 1's keys
    assert zombie.alive()
    assert submit(client, pool).wait(timeout=120).job_id  # and both keep serving


def test_cancelling_an_ended_job_changes_nothing_and_a_reused_id_runs(client: Client, pool: Pool) -> None:
    pool.start()
    handle = submit(client, pool)
    handle.wait(timeout=120)
    record = client.cancel(handle.job_id)
    assert record.status is JobStatus.SUCCEEDED
    assert not client.jobs.redis.exists(cancel_key(handle.job_id))  # no flag left to stop a later job
    client.jobs.redis.delete(job_key(handle.job_id))  # the record expires
    again = submit(client, pool, job_id=handle.job_id)
    assert again.wait(timeout=120).job_id == handle.job_id


def test_a_running_job_stopped_by_a_cancel_flag_ends_cancelled(client: Client, pool: Pool) -> None:
    pool.start()
    handle = submit(client, pool, "a long boat", steps=400)
    wait_until(lambda: client.jobs.progress(handle.job_id) is not None, what="the first step")
    client.jobs.redis.set(cancel_key(handle.job_id), "1")  # as an older version's cancel left it
    wait_until(lambda: client.status(handle.job_id).status.is_terminal, timeout=60, what="the cancel")
    assert client.status(handle.job_id).status is JobStatus.CANCELLED


def test_a_rerun_of_an_id_never_adopts_or_overwrites_the_old_result(client: Client, pool: Pool) -> None:
    pool.start()
    first = submit(client, pool, seed=1)
    first_result = first.wait(timeout=120)
    old_image = client.download(first_result.uris[0])
    client.jobs.redis.delete(job_key(first.job_id))  # the record expired; result.json stays
    second = submit(client, pool, job_id=first.job_id, seed=2).wait(timeout=120)
    published = published_images_match(client, first.job_id)
    assert published["submission"] == second.submission != first_result.submission
    assert published["outputs"][0]["seed"] == 2 and second.uris != first_result.uris
    assert client.download(first_result.uris[0]) == old_image  # the old images never change


def test_more_than_25_transient_retries_are_counted_and_honoured(client: Client, pool: Pool) -> None:
    pool.start(DARKROOM_TRANSIENT_RETRIES="30", DARKROOM_RETRY_BACKOFF_SECONDS="0.01",
               DARKROOM_RETRY_BACKOFF_CAP_SECONDS="0.02")
    ok = submit(client, pool, "[[fault:flaky@28]] a boat", steps=2).wait(timeout=240)
    assert ok.attempt == 29 and client.status(ok.job_id).transient_retries == 28
    doomed = submit(client, pool, "[[fault:flaky@40]] a boat", steps=2)
    with pytest.raises(JobFailed) as failure:
        doomed.wait(timeout=240)
    assert failure.value.code == ErrorCode.TRANSIENT_EXHAUSTED
    assert client.status(doomed.job_id).transient_retries == 30


def test_records_and_messages_of_newer_and_older_producers_run(client: Client, pool: Pool) -> None:
    pool.start()
    sender = celery_sender(client)
    queue = client.fleet.queue_for(pool.model)
    base = submit(client, pool)  # a normal job, for its valid job fields
    base.wait(timeout=120)
    job = client.status(base.job_id).job
    assert job is not None
    fields = {**job.model_dump(mode="json"), "seed": 3}
    # a newer producer: one more field in the message and in the stored record, a higher schema version
    newer = f"newer-{uuid.uuid4().hex[:8]}"
    sender.send_task(TASK_IMG2IMG, args=[{**fields, "job_id": newer, "schema_version": 99, "sharpen": 0.3}],
                     task_id=newer, queue=queue)
    wait_for_record(client, newer, 60)
    assert client.wait(newer, timeout=120).job_id == newer
    stored = f"stored-{uuid.uuid4().hex[:8]}"
    record = client.status(base.job_id).model_dump(mode="json")
    record.update(job_id=stored, status="queued", result=None, schema_version=99, colour_profile="p3",
                  job={**fields, "job_id": stored, "sharpen": 0.3}, submission="", attempt=0)
    client.jobs.redis.set(job_key(stored), json.dumps(record))
    sender.send_task(TASK_IMG2IMG, args=[{**fields, "job_id": stored}], task_id=stored, queue=queue)
    assert client.wait(stored, timeout=120).job_id == stored
    raw = json.loads(client.jobs.redis.get(job_key(stored)))
    assert raw["colour_profile"] == "p3"  # a field this version does not know survives its rewrites
    # an older producer: a message without schema_version and a record without the newer fields
    older = f"older-{uuid.uuid4().hex[:8]}"
    legacy = {k: v for k, v in record.items() if k not in {"submission", "schema_version", "transient_retries",
                                                            "fatal_retries", "unexpected_failures", "reconciled",
                                                            "raw_job", "colour_profile"}}
    legacy.update(job_id=older, job={**fields, "job_id": older})
    client.jobs.redis.set(job_key(older), json.dumps(legacy))
    sender.send_task(TASK_IMG2IMG, args=[{**fields, "job_id": older}], task_id=older, queue=queue)
    assert client.wait(older, timeout=120).job_id == older


def test_an_unreadable_record_goes_to_the_dead_letter_store_without_looping(client: Client, pool: Pool) -> None:
    worker = pool.start()
    job_id = f"broken-{uuid.uuid4().hex[:8]}"
    client.jobs.redis.set(job_key(job_id), json.dumps({"job_id": job_id, "status": "paused-by-v9"}))
    base = submit(client, pool)
    payload = client.status(base.job_id).job.model_dump(mode="json")  # type: ignore[union-attr]
    celery_sender(client).send_task(TASK_IMG2IMG, args=[{**payload, "job_id": job_id}], task_id=job_id,
                                    queue=client.fleet.queue_for(pool.model))
    wait_until(lambda: client.jobs.redis.hexists(DEAD_LETTERS_KEY, job_id), what="the dead letter")
    assert json.loads(client.jobs.redis.get(job_key(job_id)))["status"] == "paused-by-v9"  # never rewritten
    base.wait(timeout=120)
    assert worker.alive()


def test_a_lost_message_is_recovered_by_the_reconciler(client: Client, pool: Pool) -> None:
    pool.start(DARKROOM_RECONCILE_GRACE_SECONDS="1", DARKROOM_RECONCILE_INTERVAL_SECONDS="1")
    uri = client.upload(png_bytes(sample_image(64)), f"s3://darkroom/inputs/{uuid.uuid4().hex}.png")
    job = client.prepare({"model": pool.model, "image": uri, "prompt": "a boat", "strength": 1.0,
                          "num_inference_steps": 4, "seed": 5})
    client.jobs.create(job)  # a queued record whose broker message never arrived (or was lost)
    assert job.job_id is not None
    result = client.wait(job.job_id, timeout=120)
    assert result.job_id == job.job_id and client.status(job.job_id).reconciled == 1
    assert "reconciled" in events(client, client.handle(job.job_id))


def test_a_worker_with_a_long_reconcile_interval_does_not_hold_off_one_with_a_short_one(client: Client) -> None:
    from darkroom.common.lifecycle import Lifecycle
    from darkroom.worker.recovery import RECONCILER_LAST, Reconciler

    rdb = client.jobs.redis
    rdb.delete(RECONCILER_LAST)
    slow = Reconciler(rdb, Lifecycle(rdb), grace_seconds=3600, interval_seconds=3600, owner="slow")
    quick = Reconciler(rdb, Lifecycle(rdb), grace_seconds=3600, interval_seconds=2, owner="quick")
    swept = lambda reconciler: rdb.get(RECONCILER_LAST)  # noqa: E731
    # Given the worker with an hour's interval has just swept
    slow.run_once()
    first = swept(slow)
    assert first is not None
    # Then within 2 s nobody sweeps again, and after it the quick one does, while the slow one still waits
    quick.run_once()
    assert swept(quick) == first
    wait_until(lambda: (quick.run_once(), swept(quick) != first)[1], timeout=10, what="the quick worker's sweep")
    second = swept(quick)
    slow.run_once()
    assert swept(slow) == second


def test_the_reconciler_finds_messages_in_queues_and_unacked_whoever_wrote_them(client: Client) -> None:
    from darkroom.common.broker import UNACKED, origin, task_message
    from darkroom.common.lifecycle import Lifecycle
    from darkroom.worker.recovery import Reconciler

    rdb = client.jobs.redis
    queue = f"darkroom.img2img.cold.probe{uuid.uuid4().hex[:6]}"
    ids = [uuid.uuid4().hex for _ in range(5)]
    messages = [task_message(TASK_IMG2IMG, job_id, [{"job_id": job_id, "prompt": f'"id": "{ids[4]}"'}],
                             queue=queue, priority=6, sender=origin()) for job_id in ids]
    # Given a compact message (the SDK's) and a kombu-style one (spaces after separators) in a queue list, one in
    # kombu's unacked hash, one nowhere, and one whose id only appears inside another's prompt
    rdb.lpush(messages[0][0], messages[0][1])
    rdb.lpush(messages[1][0], json.dumps(json.loads(messages[1][1])))
    tag = uuid.uuid4().hex
    rdb.hset(UNACKED, tag, json.dumps([json.loads(messages[2][1]), "", queue]))
    try:
        # When the reconciler looks for their messages
        found = Reconciler(rdb, Lifecycle(rdb), grace_seconds=60, interval_seconds=30,
                           owner="test")._jobs_with_messages(set(ids))
        # Then it finds exactly the three that have one
        assert found == set(ids[:3])
    finally:
        rdb.delete(messages[0][0])
        rdb.hdel(UNACKED, tag)


def test_a_plain_celery_message_that_fails_validation_is_a_failed_job(client: Client, pool: Pool) -> None:
    pool.start()
    submit(client, pool).wait(timeout=120)  # the queue exists and the worker serves it
    sender = celery_sender(client)
    queue = client.fleet.queue_for(pool.model)
    job_id = f"plain-{uuid.uuid4().hex[:8]}"
    sender.send_task(TASK_IMG2IMG, args=[{"job_id": job_id, "model": pool.model, "image": "s3://darkroom/x.png",
                                          "prompt": "a boat", "strength": 7}], task_id=job_id, queue=queue)
    wait_for_record(client, job_id, 60)
    with pytest.raises(JobFailed) as failure:
        client.wait(job_id, timeout=30)
    assert failure.value.code == ErrorCode.INVALID_JOB and "strength" in str(failure.value)
    before = len(client.jobs.dead_letters())
    sender.send_task(TASK_IMG2IMG, args=[["not", "a", "job"]], task_id=uuid.uuid4().hex, queue=queue)
    wait_until(lambda: len(client.jobs.dead_letters()) > before, what="the dead letter")
    raw = [d for d in client.jobs.dead_letters().values() if "not" in str(d.get("raw"))]
    assert raw and "JSON object" in raw[0]["reason"]


def test_a_job_past_its_time_limit_fails_timeout(client: Client, pool: Pool) -> None:
    pool.start(DARKROOM_JOB_TIME_BASE_SECONDS="1", DARKROOM_JOB_TIME_FACTOR="0")
    handle = submit(client, pool, "a long boat", steps=400)
    with pytest.raises(JobFailed) as failure:
        handle.wait(timeout=120)
    assert failure.value.code == ErrorCode.TIMEOUT


def test_a_worker_whose_engine_hangs_is_recycled(client: Client, pool: Pool) -> None:
    worker = pool.start(DARKROOM_ENGINE_STALL_SECONDS="2")
    submit(client, pool, "[[fault:hang]] a boat")
    assert worker.proc is not None
    assert worker.proc.wait(60) == 75
    assert "no denoising step" in worker.tail(100)


def test_services_down_and_up_keep_every_job(tmp_path: Path) -> None:
    services = EmbeddedServices(tmp_path / "state")
    endpoints = services.up()
    try:
        client = redis.Redis.from_url(endpoints.redis_url)
        store = JobStore(client)
        job_ids = [f"keep-{i}" for i in range(20)]
        for job_id in job_ids:
            client.set(job_key(job_id), json.dumps({"job_id": job_id, "status": "queued"}))
        client.close()
        services.down()
        endpoints = services.up()
        client = redis.Redis.from_url(endpoints.redis_url)
        assert all(client.exists(job_key(j)) for j in job_ids)
        assert store is not None
        client.close()
    finally:
        services.down()
