from __future__ import annotations

from datetime import UTC, datetime

from darkroom.common.jobstore import JobRecord
from darkroom.common.status import JobStatus
from darkroom.worker.delivery import backoff


def test_backoff_doubles_with_equal_jitter_and_a_cap() -> None:
    for retry, ceiling in [(0, 1.0), (1, 2.0), (3, 8.0), (10, 60.0)]:
        delays = [backoff(retry) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 10  # jittered


def _record(**counters: int) -> JobRecord:
    now = datetime.now(UTC)
    return JobRecord(job_id="j", status=JobStatus.QUEUED, job=None, created_at=now, updated_at=now, **counters)


def test_lost_attempts_are_counted_from_integer_counters_not_history() -> None:
    # 4 attempts: one ended in a transient retry, one in a worker-fatal requeue, two without an outcome
    assert _record(attempt=4, transient_retries=1, fatal_retries=1).lost_attempts == 2
    assert _record(attempt=1).lost_attempts == 1
    assert _record().lost_attempts == 0
    # 40 transient retries (more than the history list keeps) still count
    assert _record(attempt=41, transient_retries=40).lost_attempts == 1


def test_backoff_stays_capped_for_very_many_retries() -> None:
    assert 30.0 <= backoff(10_000) <= 60.0
