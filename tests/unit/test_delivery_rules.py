from __future__ import annotations

from darkroom.worker.delivery import backoff
from darkroom.worker.runner import lost_attempts


def test_backoff_doubles_with_equal_jitter_and_a_cap() -> None:
    for retry, ceiling in [(0, 1.0), (1, 2.0), (3, 8.0), (10, 60.0)]:
        delays = [backoff(retry) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 10  # jittered


def test_only_starts_without_an_outcome_count_as_lost() -> None:
    h = [{"event": e} for e in ["started", "transient", "started", "deferred", "started", "started", "finished"]]
    # start 1 -> transient (kept), start 2 -> (deferred ignored) start 3: lost, start 3 -> start 4: lost
    assert lost_attempts(h) == 2
    assert lost_attempts([{"event": "started"}]) == 1
    assert lost_attempts([]) == 0
