"""Where each cell of a run stands before anything is sent: done, failed, in flight, or never submitted.

Job records in Redis say it (one MGET per 1,000 cells); for cells without a record (never submitted, or the
record expired after ``DARKROOM_STATUS_TTL_SECONDS``) a committed ``result.json`` under the output prefix
(one listing of the prefix) counts as done. Nothing is written here: a dry run is a plan, printed.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from darkroom.common.jobstore import JobRecord, job_key
from darkroom.common.status import JobStatus
from darkroom.common.storage import S3Uri

from .grid import Cell

__all__ = ["Estimate", "Plan", "read_states"]

_MGET = 1000
_SAMPLE = 200
RESULT_NAME = "result.json"


@dataclass(frozen=True)
class Estimate:
    """How long the rest may take: cells to run × the median job time of this run ÷ live workers of the model."""

    remaining: int
    median_job_seconds: float | None
    workers: int
    sample: int

    @property
    def seconds(self) -> float | None:
        if self.median_job_seconds is None or not self.workers:
            return None
        return self.remaining * self.median_job_seconds / self.workers

    def describe(self) -> str:
        if not self.remaining:
            return "nothing left to run"
        if not self.workers:
            return "no live worker serves this model now: jobs wait in the queue until one starts"
        if self.median_job_seconds is None:
            return (f"no job of this run has finished yet, so no time estimate; {self.remaining} job(s) for "
                    f"{self.workers} worker(s)")
        return (f"about {format_duration(self.seconds or 0.0)} with {self.workers} worker(s) (median job "
                f"{self.median_job_seconds:.2f} s over {self.sample} finished job(s) of this run)")


@dataclass
class Plan:
    """Each cell's status now (None: never submitted), and what follows from it."""

    cells: Sequence[Cell]
    states: dict[str, JobStatus | None]
    records: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)  # parsed records (JSON)

    def count(self) -> Counter[str]:
        """Cells per status (succeeded, failed, cancelled, queued, started), and ``new`` for never submitted."""
        return Counter("new" if s is None else s.value for s in self.states.values())

    @property
    def done(self) -> int:
        return sum(1 for s in self.states.values() if s is JobStatus.SUCCEEDED)

    @property
    def ended_badly(self) -> int:
        return sum(1 for s in self.states.values() if s in (JobStatus.FAILED, JobStatus.CANCELLED))

    @property
    def in_flight(self) -> int:
        return sum(1 for s in self.states.values() if s in (JobStatus.QUEUED, JobStatus.STARTED))

    @property
    def new(self) -> int:
        return sum(1 for s in self.states.values() if s is None)

    def to_follow(self, retry_failed: bool) -> list[Cell]:
        """The cells the run submits or watches: all not done (failed and cancelled ones only with ``retry_failed``)."""
        skip = {JobStatus.SUCCEEDED} | (set() if retry_failed else {JobStatus.FAILED, JobStatus.CANCELLED})
        return [c for c in self.cells if self.states[c.job_id] not in skip]

    def median_job_seconds(self) -> tuple[float | None, int]:
        """The median ``timings.total`` of (up to 200) succeeded jobs, and how many it is taken over."""
        totals = []
        for raw in self.records.values():
            if raw.get("status") == JobStatus.SUCCEEDED.value:
                total = ((raw.get("result") or {}).get("timings") or {}).get("total")
                if isinstance(total, (int, float)):
                    totals.append(float(total))
            if len(totals) >= _SAMPLE:
                break
        return (statistics.median(totals) if totals else None), len(totals)


def read_states(redis: Any, store: Any, cells: Sequence[Cell], output_prefix: str) -> Plan:
    """Read every cell's status: its record in Redis, else a committed result.json in the output prefix."""
    states: dict[str, JobStatus | None] = {}
    records: dict[str, dict[str, Any]] = {}
    for start in range(0, len(cells), _MGET):
        part = cells[start:start + _MGET]
        for cell, raw in zip(part, redis.mget([job_key(c.job_id) for c in part]), strict=True):
            if raw is None:
                states[cell.job_id] = None
                continue
            record = json.loads(raw)
            states[cell.job_id] = JobStatus(record["status"])
            records[cell.job_id] = record
    if any(s is None for s in states.values()):
        for job_id in committed_jobs(store, output_prefix):
            if job_id in states and states[job_id] is None:
                states[job_id] = JobStatus.SUCCEEDED
    return Plan(cells, states, records)


def committed_jobs(store: Any, output_prefix: str) -> set[str]:
    """Ids of the jobs that committed a ``result.json`` under the prefix (one listing)."""
    root = S3Uri.parse(output_prefix, allow_empty_key=True)
    folder = S3Uri(root.bucket, root.key + "/" if root.key else "")
    found = set()
    for listed in store.list_objects(folder):
        rest = listed.uri.key[len(folder.key):]
        job_id, _, name = rest.partition("/")
        if name == RESULT_NAME:
            found.add(job_id)
    return found


def record_of(raw: dict[str, Any]) -> JobRecord:
    return JobRecord.model_validate(raw)


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
