"""Bulk-backlog utilization: busy worker-seconds over available ones while bulk work waits."""

from __future__ import annotations

import pytest

from darkroom.dev.fleetstats import backlog_utilization, merge, overlap


def test_merge_joins_overlapping_and_touching_intervals_and_drops_empty_ones() -> None:
    assert merge([(5, 6), (0, 2), (1, 3), (3, 4), (7, 7), (9, 8)]) == [(0, 4), (5, 6)]


def test_overlap_of_two_interval_lists() -> None:
    assert overlap([(0, 4), (6, 10)], [(2, 7), (9, 12)]) == pytest.approx(2 + 1 + 1)
    assert overlap([], [(0, 1)]) == 0


def test_only_the_seconds_with_bulk_work_waiting_count() -> None:
    # bulk work waits in [0, 10] and [20, 30]; two workers
    waits = [(0, 6), (4, 10), (20, 30)]
    busy = {"a": [(0, 10), (10, 20), (20, 25)],  # busy through both backlogs but for 25..30
            "b": [(12, 18), (2, 3)]}  # idle while bulk work waits, but for one second
    result = backlog_utilization(waits, busy, workers=2)
    assert result.backlog_seconds == pytest.approx(20)
    assert result.available_seconds == pytest.approx(40)
    assert result.busy_seconds == pytest.approx(10 + 5 + 1)
    assert result.fraction == pytest.approx(16 / 40)


def test_a_workers_overlapping_calls_count_once_and_idle_workers_count_as_available() -> None:
    result = backlog_utilization([(0, 10)], {"a": [(0, 10), (5, 10)]}, workers=4)
    assert result.fraction == pytest.approx(10 / 40)


def test_no_bulk_work_waiting_gives_no_figure() -> None:
    assert backlog_utilization([], {"a": [(0, 1)]}, workers=1).fraction is None


def test_a_job_waited_for_the_part_of_its_models_loads_inside_its_time_in_the_engine() -> None:
    from darkroom.dev.fleetstats import load_wait

    loads = [(10, 20), (15, 25), (40, 50)]  # overlapping loads count once
    assert load_wait((0, 30), loads) == pytest.approx(15)  # arrived before a load that its own call ran
    assert load_wait((18, 30), loads) == pytest.approx(7)  # arrived late in a load beside the engine
    assert load_wait((26, 39), loads) == 0  # the model was resident all along
    assert load_wait((30, 30), loads) == 0


def test_subtract_keeps_the_parts_outside() -> None:
    from darkroom.dev.fleetstats import subtract

    assert subtract([(0, 10), (20, 30)], [(2, 4), (8, 22), (25, 26)]) == [(0, 2), (4, 8), (22, 25), (26, 30)]
    assert subtract([(0, 5)], []) == [(0, 5)]
    assert subtract([(0, 5)], [(0, 5)]) == []


def test_the_backlog_splits_into_seconds_with_work_in_the_broker_and_seconds_with_all_of_it_taken() -> None:
    from darkroom.dev.fleetstats import backlog_split

    # bulk work waits in [0, 20]; some of it sits in the broker during [0, 8]; after that every waiting job
    # is already on a worker (reserved), so the idle worker b has nothing to take
    waits = [(0, 20), (0, 5)]
    queued = [(0, 8), (0, 2), (25, 30)]  # outside the backlog: ignored
    busy = {"a": [(0, 20)], "b": [(0, 8)]}
    broker, taken = backlog_split(waits, queued, busy, workers=2)
    assert broker.backlog_seconds == pytest.approx(8) and broker.fraction == pytest.approx(1.0)
    assert taken.backlog_seconds == pytest.approx(12) and taken.fraction == pytest.approx(12 / 24)
    whole = backlog_utilization(waits, busy, workers=2)
    assert broker.busy_seconds + taken.busy_seconds == pytest.approx(whole.busy_seconds)
