"""What workers enforce for producers beyond signatures, through a real `darkroom worker`: quotas on work
written past the SDK (held back, not failed) and signed cancels obeyed only for the job's own producer.

Runs on the same registry fixture as test_producers (its own Redis database)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest

from darkroom.common.cancels import CANCELS_KEY, CancelAnswer, CancelRequest, reply_key, sign_cancel
from darkroom.common.errors import ErrorCode, NotPermitted
from darkroom.common.identity import Signer
from darkroom.common.jobstore import history_key
from darkroom.common.producers import ProducerPolicy
from darkroom.common.status import JobStatus
from darkroom.producer.client import Client

from . import test_producers
from .test_producers import JOB, _list, client_for, image, new_id, send_signed, signature

tenancy = test_producers.tenancy  # its module fixture: two registered producers, a worker, a dispatcher

pytestmark = pytest.mark.integration

LONG = {**JOB, "prompt": "long", "strength": 1.0, "num_inference_steps": 900}


def history(client: Client, job_id: str) -> list[dict[str, Any]]:
    return [json.loads(e) for e in client.jobs.redis.lrange(history_key(job_id), 0, -1)]


def until(condition: Any, timeout: float = 90.0, what: str = "the condition") -> None:
    """Wait on an observable change (a record or history entry), polling Redis."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def signed_fields(client: Client, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "image": image(client), "job_id": new_id(client), "output_prefix": "s3://darkroom/outputs",
            **extra}


def running(client: Client, job_id: str) -> bool:
    record = client.jobs.get(job_id)
    return record is not None and record.status is JobStatus.STARTED


# -- quotas --------------------------------------------------------------------------------------------------------
def test_a_job_past_the_in_flight_quota_written_past_the_sdk_waits_until_one_ends(tenancy: dict[str, Any]) -> None:
    # Given a producer allowed one job in flight, whose jobs are written straight into Redis (the SDK's count skipped)
    entry, secret = tenancy["registry"].add(f"team-w{uuid.uuid4().hex[:4]}", ProducerPolicy(max_in_flight=1))
    tenancy["keys"][entry.id] = (entry.keys[0].key_id, secret)
    with client_for(tenancy, entry.id) as client:
        first_fields = signed_fields(client, **LONG)
        first = send_signed(client, first_fields, signature(tenancy, entry.id, first_fields))
        until(lambda: running(client, first), what="the first job to start")
        # When a second one arrives while the first runs
        second_fields = signed_fields(client, **JOB)
        second = send_signed(client, second_fields, signature(tenancy, entry.id, second_fields))
        # Then the worker holds it back with quota_exceeded, and it stays queued (not failed)
        until(lambda: any(e["event"] == "held_back" for e in history(client, second)), what="the hold-back note")
        note = next(e for e in history(client, second) if e["event"] == "held_back")
        assert note["code"] == "quota_exceeded" and "its most in flight (1)" in note["reason"]
        assert client.status(second).status is JobStatus.QUEUED and client.status(second).attempt == 0
        assert running(client, first)
        # and once the first ends (its producer cancels it), the second runs
        assert client.cancel(first).status is JobStatus.CANCELLED
        assert client.wait(second, timeout=120).job_id == second
        assert _list(client, first) == []


def test_the_workers_quota_count_admits_a_job_once_and_holds_back_per_minute(tenancy: dict[str, Any]) -> None:
    from darkroom.common.quotas import WorkerQuota

    now = [3600.0 * 1000 + 10]
    quota = WorkerQuota(tenancy["redis"], clock=lambda: now[0])
    policy = ProducerPolicy(max_per_minute=2)
    name = f"team-m{uuid.uuid4().hex[:4]}"
    assert quota.take(name, policy, "a") is None and quota.take(name, policy, "b") is None
    assert quota.take(name, policy, "a") is None  # admitted before (a retry, a redelivery): not counted again
    held = quota.take(name, policy, "c")
    assert held is not None and "its most per minute (2)" in held.message and 50 <= held.retry_after <= 55
    now[0] += 60  # the next minute
    assert quota.take(name, policy, "c") is None


# -- signed cancels -------------------------------------------------------------------------------------------------
def ask(client: Client, request: CancelRequest | dict[str, Any]) -> CancelAnswer:
    """Push a cancel request past the SDK and wait for the worker's answer."""
    raw = request.model_dump_json() if isinstance(request, CancelRequest) else json.dumps(request)
    client.jobs.redis.rpush(CANCELS_KEY, raw)
    job_id, rid = (request.job_id, request.request_id) if isinstance(request, CancelRequest) else \
        (request["job_id"], request["request_id"])
    popped = client.jobs.redis.blpop([reply_key(job_id, rid)], timeout=10)
    assert popped is not None, "no worker answered the cancel"
    return CancelAnswer.loads(popped[1])


def test_only_a_cancel_signed_by_the_jobs_producer_stops_it(tenancy: dict[str, Any]) -> None:
    with client_for(tenancy, "team-b") as b, client_for(tenancy, "team-a") as a, client_for(tenancy, None) as anon:
        handle = b.submit({"model": "tiny", "image": image(b), **LONG, "output_prefix": "s3://darkroom/outputs"})
        until(lambda: running(b, handle.job_id), what="team-b's job to start")
        submission = b.status(handle.job_id).submission
        key_a = tenancy["keys"]["team-a"]
        # When team-a signs a cancel of team-b's job, or signs one as team-b with its own key, or sends one unsigned
        as_a = sign_cancel(Signer("team-a", *key_a), handle.job_id, submission)
        forged = sign_cancel(Signer("team-b", tenancy["keys"]["team-b"][0], key_a[1]), handle.job_id, submission)
        unsigned = {"job_id": handle.job_id, "submission": submission, "request_id": uuid.uuid4().hex}
        # Then the worker refuses each, with a code and a message
        answer = ask(a, as_a)
        assert answer.code is ErrorCode.NOT_PERMITTED and "is not producer 'team-a''s" in answer.message
        answer = ask(a, forged)
        assert answer.code is ErrorCode.UNAUTHENTICATED and "signature does not match" in answer.message
        answer = ask(a, unsigned)
        assert answer.code is ErrorCode.UNAUTHENTICATED and "not signed" in answer.message
        # and an unsigned SDK client is told so before anything is sent; team-a's SDK refuses early too
        with pytest.raises(NotPermitted) as direct:
            anon.cancel(handle.job_id)
        assert direct.value.code == ErrorCode.UNAUTHENTICATED and "signed by producer 'team-b'" in direct.value.message
        with pytest.raises(NotPermitted, match="belongs to producer 'team-b'"):
            a.cancel(handle.job_id)
        # and the job keeps running: a step later it is still started, its history names the refusals
        steps = [e for e in history(b, handle.job_id) if e["event"] == "refused_cancel"]
        assert [e["code"] for e in steps] == ["not_permitted", "unauthenticated", "unauthenticated"]
        assert running(b, handle.job_id)
        # When team-b cancels it (signed, through the SDK), it stops and publishes nothing
        assert b.cancel(handle.job_id).status is JobStatus.CANCELLED
        until(lambda: b.jobs.redis.get(f"darkroom:lease:{handle.job_id}") is None, what="the attempt to stop")
        assert _list(b, handle.job_id) == []
        # and a replay of that request for a later submission of the same id changes nothing (tied to a submission)
        stale = sign_cancel(Signer("team-b", *tenancy["keys"]["team-b"]), handle.job_id, "another-submission")
        assert ask(b, stale).code is ErrorCode.NOT_PERMITTED
