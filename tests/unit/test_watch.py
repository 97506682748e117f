"""Client.watch's decisions, without Redis: when to read, what to report, in which order, when to stop."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from darkroom.common.errors import WaitTimeout
from darkroom.common.events import EventType, JobEvent
from darkroom.common.jobs import Img2ImgJob
from darkroom.common.jobstore import WAIT_RECONNECT_SECONDS, JobNotFound, JobRecord, Outage
from darkroom.common.status import JobStatus
from darkroom.producer._watch import RECHECK_SECONDS, Listen, Read, Watch

NOW = datetime(2026, 1, 1, tzinfo=UTC)
JOB = Img2ImgJob(model="tiny", image="s3://bkt/in.png", prompt="x")


def record(job_id: str, status: JobStatus, attempt: int = 0) -> bytes:
    return JobRecord(job_id=job_id, status=status, job=JOB, created_at=NOW, updated_at=NOW,
                     attempt=attempt).model_dump_json().encode()


def message(job_id: str, type_: EventType, attempt: int = 0, **extra: Any) -> dict[str, Any]:
    status = JobStatus.STARTED if type_ is EventType.PROGRESS else JobStatus(type_.value)
    event = JobEvent(type=type_, job_id=job_id, status=status, time=NOW, attempt=attempt, **extra)
    return {"type": "message", "channel": f"darkroom:events:{job_id}", "data": event.model_dump_json()}


def subscribed(watch: Watch) -> None:
    for channel in watch.channels:
        watch.on_message({"type": "subscribe", "channel": channel, "data": 1})


def test_reads_only_once_every_subscription_is_confirmed() -> None:
    watch = Watch(["a", "b"])
    assert watch.next() == Listen(RECHECK_SECONDS)
    watch.on_message({"type": "subscribe", "channel": "darkroom:events:a", "data": 1})
    assert isinstance(watch.next(), Listen)
    watch.on_message({"type": "subscribe", "channel": "darkroom:events:b", "data": 2})
    assert watch.next() == Read(["a", "b"])


def test_reports_finished_jobs_from_the_read_and_ends_when_all_are_terminal() -> None:
    watch = Watch(["a", "b"])
    subscribed(watch)
    events = watch.on_records(["a", "b"], [record("a", JobStatus.SUCCEEDED, 1), record("b", JobStatus.STARTED, 1)])
    assert [(e.job_id, e.type) for e in events] == [("a", EventType.SUCCEEDED), ("b", EventType.STARTED)]
    assert watch.pending == ["b"] and isinstance(watch.next(), Listen)
    assert [e.step for e in watch.on_message(message("b", EventType.PROGRESS, 1, step=1, total_steps=2))] == [1]
    assert [e.type for e in watch.on_message(message("b", EventType.FAILED, 1, error_code="x"))] == [EventType.FAILED]
    assert watch.done and watch.next() is None


def test_messages_older_than_the_read_are_dropped_and_duplicates_reported_once() -> None:
    # Given a read that already saw the job requeued after its first attempt
    watch = Watch(["a"])
    subscribed(watch)
    watch.on_records(["a"], [record("a", JobStatus.QUEUED, 1)])
    # When messages published before the read arrive afterwards, they are not news
    assert watch.on_message(message("a", EventType.STARTED, 1)) == []
    assert watch.on_message(message("a", EventType.PROGRESS, 1, step=3, total_steps=9)) == []
    assert watch.on_message(message("a", EventType.QUEUED, 1)) == []
    # Then the second attempt is
    assert [e.type for e in watch.on_message(message("a", EventType.STARTED, 2))] == [EventType.STARTED]
    # and once terminal, nothing more is reported for the job
    assert len(watch.on_message(message("a", EventType.CANCELLED, 2))) == 1
    assert watch.on_message(message("a", EventType.SUCCEEDED, 2)) == []


def test_silence_schedules_a_re_read_of_the_pending_jobs() -> None:
    watch = Watch(["a", "b"])
    subscribed(watch)
    watch.on_records(["a", "b"], [record("a", JobStatus.SUCCEEDED), record("b", JobStatus.QUEUED)])
    assert isinstance(watch.next(), Listen)
    watch.on_message(None)
    assert watch.next() == Read(["b"])


def test_unknown_job_raises_not_found() -> None:
    watch = Watch(["a"])
    subscribed(watch)
    with pytest.raises(JobNotFound):
        watch.on_records(["a"], [None])


def test_timeout_names_the_jobs_still_running() -> None:
    now = [100.0]
    watch = Watch(["a", "b"], timeout=2.0, clock=lambda: now[0])
    subscribed(watch)
    watch.on_records(["a", "b"], [record("a", JobStatus.SUCCEEDED), record("b", JobStatus.STARTED, 1)])
    assert watch.next() == Listen(2.0)
    now[0] = 102.5
    with pytest.raises(WaitTimeout, match="1 job.* not finished after 2.0 s: b"):
        watch.next()


def test_no_jobs_is_done_at_once() -> None:
    assert Watch([]).next() is None


def test_a_new_subscription_waits_for_its_confirmations_then_reads_again() -> None:
    # Given a watch that has read and is listening
    watch = Watch(["a", "b"])
    subscribed(watch)
    watch.on_records(["a", "b"], [record("a", JobStatus.QUEUED), record("b", JobStatus.QUEUED)])
    assert isinstance(watch.next(), Listen)
    # When its connection was lost and the driver subscribes on a new one
    watch.subscribing()
    # Then it listens until both channels are confirmed again, then reads what the lost connection missed
    assert isinstance(watch.next(), Listen)
    subscribed(watch)
    assert watch.next() == Read(["a", "b"])
    events = watch.on_records(["a", "b"], [record("a", JobStatus.SUCCEEDED, 1), record("b", JobStatus.QUEUED)])
    assert [(e.job_id, e.type) for e in events] == [("a", EventType.SUCCEEDED)]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_outage_is_retried_for_the_reconnect_window_and_each_success_restarts_it() -> None:
    clock = Clock()
    outage = Outage(clock=clock)
    assert outage.lost()
    clock.now += WAIT_RECONNECT_SECONDS - 1
    assert outage.lost()  # still within the window opened by the first loss
    outage.over()  # a command succeeded: a later loss opens a new window
    clock.now += 5
    assert outage.lost()
    clock.now += WAIT_RECONNECT_SECONDS
    assert not outage.lost()


def test_an_outage_never_outlasts_the_wait_s_own_timeout() -> None:
    clock = Clock()
    outage = Outage(3.0, clock=clock)
    assert outage.lost()
    clock.now += 3.0
    assert not outage.lost()


def test_a_subscription_redis_py_renewed_by_itself_makes_the_watch_read_again() -> None:
    # Given a watch that has read and is listening
    watch = Watch(["a", "b"])
    subscribed(watch)
    watch.on_records(["a", "b"], [record("a", JobStatus.QUEUED), record("b", JobStatus.QUEUED)])
    assert isinstance(watch.next(), Listen)
    # When redis-py reconnects on its own and its new subscriptions are confirmed (no error reached the driver)
    subscribed(watch)
    # Then the watch reads the records at once, since events published in the gap are lost
    assert watch.next() == Read(["a", "b"])
