"""Where a bulk augmentation run (``darkroom augment``) keeps its live progress in Redis.

The producer running the augmentation writes; dashboards read::

    darkroom:augment:{run_id}     hash: total, done, failed, in_flight, started_at, updated_at, output_prefix,
                                  and also run_id, model, state (running | stopped | finished)
    darkroom:augment:runs         sorted set of run ids, score = started_at (Unix seconds)

Counts are of grid cells (one job each): ``done`` succeeded (earlier runs included), ``failed`` failed or
cancelled, ``in_flight`` queued or running. Times are Unix seconds as decimal strings. Pure names, no I/O.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["AUGMENT_RUNS_KEY", "PROGRESS_FIELDS", "RunState", "augment_run_key"]

AUGMENT_RUNS_KEY = "darkroom:augment:runs"
"""Sorted set of augmentation run ids, scored by their ``started_at``."""

PROGRESS_FIELDS = ("total", "done", "failed", "in_flight", "started_at", "updated_at", "output_prefix")
"""The fields every run's hash carries (writers may add more, e.g. ``state``, ``model``, ``run_id``)."""


class RunState(StrEnum):
    """Where a run is: its producer is submitting and watching, was stopped (resumable), or has finished."""

    RUNNING = "running"
    STOPPED = "stopped"
    FINISHED = "finished"


def augment_run_key(run_id: str) -> str:
    """The hash holding one run's live progress."""
    return f"darkroom:augment:{run_id}"
