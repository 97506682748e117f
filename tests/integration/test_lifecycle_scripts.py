"""The lifecycle's scripts against a real Redis, one rule each: fences, cancels, counters and bounds."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from darkroom.common.errors import LeaseLost
from darkroom.common.events import EventType
from darkroom.common.jobs import Img2ImgJob
from darkroom.common.jobstore import DEAD_LETTERS_INDEX_KEY, DEAD_LETTERS_KEY, OPEN_JOBS_KEY, JobStore, cancel_key
from darkroom.common.lifecycle import Fence, Lifecycle, StartReply, lease_key
from darkroom.common.settings import Settings
from darkroom.common.status import JobStatus
from darkroom.common.webhooks import OUTBOX_KEY
from darkroom.producer.webhooks.deliveries import DEAD_INDEX_KEY, DEAD_KEY, Delivery, DeliveryQueue

pytestmark = pytest.mark.integration


@pytest.fixture()
def r(settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(settings.redis_url.get_secret_value())
    yield client
    client.close()


def job(**extra: Any) -> Img2ImgJob:
    return Img2ImgJob(job_id=f"j-{uuid.uuid4().hex[:10]}", model="tiny", image="s3://darkroom/in.png",
                      prompt="a boat", strength=0.5, **extra)


def test_a_takeover_makes_the_first_attempts_fence_stale(r: redis.Redis) -> None:
    life, store = Lifecycle(r), JobStore(r)
    record = store.create(job())
    first = life.start(record.job_id, None, worker="a", lease_seconds=0.2, max_lost=5)
    assert first.reply is StartReply.STARTED and first.fence is not None and first.fence.attempt == 1
    assert life.start(record.job_id, None, worker="b", lease_seconds=5, max_lost=5).reply is StartReply.HELD
    r.delete(lease_key(record.job_id))  # A's lease expired while A was paused
    second = life.start(record.job_id, None, worker="b", lease_seconds=5, max_lost=5)
    assert second.reply is StartReply.STARTED and second.fence is not None and second.fence.attempt == 2
    assert first.record is not None and second.record is not None
    with pytest.raises(LeaseLost):  # A wakes up: nothing it asks for is accepted
        life.succeed(first.fence, first.record, None)  # type: ignore[arg-type]
    with pytest.raises(LeaseLost):
        life.retry(first.fence, first.record, "blip", max_retries=5, delay=lambda n: 1.0, lease_seconds=5.0)
    assert life.report_progress(first.fence, first.record, 3, 10) == "stale"
    assert r.get(lease_key(record.job_id)).decode().startswith(second.fence.tag)  # B's lease untouched
    done = life.fail(second.fence, second.record, "internal_error", "boom")
    assert done.status is JobStatus.FAILED and not r.exists(lease_key(record.job_id))
    assert r.zscore(OPEN_JOBS_KEY, record.job_id) is None


def test_cancel_only_changes_live_jobs_and_create_clears_stale_flags(r: redis.Redis) -> None:
    life, store = Lifecycle(r), JobStore(r)
    record = store.create(job())
    started = life.start(record.job_id, None, worker="a", lease_seconds=5, max_lost=5)
    assert started.fence is not None and started.record is not None
    life.fail(started.fence, started.record, "internal_error", "boom")
    after, changed = life.cancel(record.job_id)
    assert not changed and after is not None and after.status is JobStatus.FAILED
    assert not r.exists(cancel_key(record.job_id))
    r.set(cancel_key(record.job_id), "left by an old version")
    r.delete(f"darkroom:job:{record.job_id}")
    store.create(record.job)  # type: ignore[arg-type]
    assert not r.exists(cancel_key(record.job_id))
    live, changed = life.cancel(record.job_id)
    assert changed and live is not None and live.status is JobStatus.CANCELLED and r.exists(cancel_key(record.job_id))


def test_counters_are_record_fields_beyond_the_history_length(r: redis.Redis) -> None:
    life, store = Lifecycle(r), JobStore(r)
    record = store.create(job())
    for _ in range(60):
        started = life.start(record.job_id, None, worker="a", lease_seconds=5, max_lost=2)
        assert started.reply is StartReply.STARTED and started.fence is not None and started.record is not None
        life.retry(started.fence, started.record, "blip", max_retries=100, delay=lambda n: 0.0, lease_seconds=0.001)
        r.delete(lease_key(record.job_id))
    current = store.require(record.job_id)
    assert current.transient_retries == 60 and current.attempt == 60 and current.lost_attempts == 0
    assert len(store.history(record.job_id)) == 50  # the history stays bounded


def test_dead_letters_are_bounded_by_count(r: redis.Redis) -> None:
    life = Lifecycle(r, dead_letter_max=3)
    r.delete(DEAD_LETTERS_KEY, DEAD_LETTERS_INDEX_KEY)
    for i in range(7):
        life.dead_letter_message({"n": i}, "no job id")
    kept = JobStore(r).dead_letters()
    assert len(kept) == 3 and r.zcard(DEAD_LETTERS_INDEX_KEY) == 3
    assert sorted(json.loads(v["raw"])["n"] for v in kept.values()) == [4, 5, 6]  # the newest


def test_webhook_dead_letters_are_bounded_by_age(r: redis.Redis) -> None:
    from datetime import UTC, datetime

    from darkroom.common.events import JobEvent
    from darkroom.common.webhooks import OutboxEntry

    queue = DeliveryQueue(r, "t", dead_retention_seconds=0, dead_max=100)
    r.delete(DEAD_KEY, DEAD_INDEX_KEY)
    for i in range(3):
        event = JobEvent(type=EventType.SUCCEEDED, job_id=f"w{i}", status=JobStatus.SUCCEEDED, time=datetime.now(UTC))
        entry = OutboxEntry(id=f"msg_{i}", job_id=f"w{i}", url="https://example.com/h", terminal=True, event=event)
        queue.bury(entry.model_dump_json(), Delivery.model_validate(entry.model_dump()))
    assert r.hlen(DEAD_KEY) <= 1  # older than the retention: trimmed as the next one lands


def test_progress_webhooks_only_when_asked_and_capped(r: redis.Redis) -> None:
    life, store = Lifecycle(r, outbox_progress_cap=0), JobStore(r)
    quiet = store.create(job(callback_url="https://example.com/hook"))
    chatty = store.create(job(callback_url="https://example.com/hook", webhook_events=["progress", "succeeded"]))
    before = r.llen(OUTBOX_KEY)
    for record in (quiet, chatty):
        started = life.start(record.job_id, None, worker="a", lease_seconds=5, max_lost=5)
        assert started.fence is not None and started.record is not None
        assert life.report_progress(started.fence, started.record, 1, 10) == "ok"
    entries = [json.loads(e) for e in r.lrange(OUTBOX_KEY, 0, r.llen(OUTBOX_KEY) - before - 1)]
    assert not any(e["event"]["type"] == "progress" for e in entries)  # quiet never asked; chatty is capped
    life.outbox_progress_cap = 10**9  # room in the outbox: the job that asked gets its progress webhook
    record = store.require(chatty.job_id)
    assert life.report_progress(Fence(record.submission, record.attempt), record, 2, 10) == "ok"
    assert json.loads(r.lindex(OUTBOX_KEY, 0))["event"]["type"] == "progress"
