"""Fleet figures computed from job records (used by ``bench/fleet_sim.py``; pure functions, no I/O).

*Bulk-backlog utilization* is the fleet's "bulk throughput / ideal": while some bulk job waits (submitted and
its pipeline call not begun yet), which fraction of the fleet's worker-seconds are busy (in a pipeline call
or loading a model). 1.0 means no worker idled while bulk work was waiting; it does not depend on how fast
the work arrives, only on whether the fleet used its capacity while there was work to do.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = ["Interval", "merge", "overlap", "subtract", "BacklogUtilization", "backlog_utilization", "backlog_split",
           "load_wait"]

Interval = tuple[float, float]


def merge(intervals: Iterable[Interval]) -> list[Interval]:
    """The union of ``intervals`` as sorted, disjoint intervals (empty and reversed ones dropped)."""
    out: list[Interval] = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def overlap(a: list[Interval], b: list[Interval]) -> float:
    """Seconds two sorted, disjoint interval lists have in common."""
    total, i, j = 0.0, 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if end > start:
            total += end - start
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def subtract(a: list[Interval], b: list[Interval]) -> list[Interval]:
    """The parts of ``a`` outside ``b`` (both sorted and disjoint, as ``merge`` returns them)."""
    out: list[Interval] = []
    j = 0
    for start, end in a:
        while j < len(b) and b[j][1] <= start:
            j += 1
        k, cursor = j, start
        while k < len(b) and b[k][0] < end:
            if b[k][0] > cursor:
                out.append((cursor, b[k][0]))
            cursor = max(cursor, b[k][1])
            k += 1
        if cursor < end:
            out.append((cursor, end))
    return out


@dataclass(frozen=True)
class BacklogUtilization:
    backlog_seconds: float  # wall seconds during which some bulk job was waiting
    busy_seconds: float  # worker-seconds busy inside those seconds
    available_seconds: float  # workers x backlog seconds

    @property
    def fraction(self) -> float | None:
        return self.busy_seconds / self.available_seconds if self.available_seconds > 0 else None


def backlog_utilization(waits: Iterable[Interval], busy: Mapping[str, Iterable[Interval]],
                        workers: int) -> BacklogUtilization:
    """Busy worker-seconds over available worker-seconds while bulk work waits.

    ``waits``: per bulk job, (submitted, its call began); ``busy``: per worker, its calls and model loads as
    (start, end), overlapping ones counted once; ``workers``: the fleet's size during the run.
    """
    backlog = merge(waits)
    span = sum(end - start for start, end in backlog)
    used = sum(overlap(merge(calls), backlog) for calls in busy.values())
    return BacklogUtilization(span, used, workers * span)


def backlog_split(waits: Iterable[Interval], queued: Iterable[Interval], busy: Mapping[str, Iterable[Interval]],
                  workers: int) -> tuple[BacklogUtilization, BacklogUtilization]:
    """``backlog_utilization`` split in two: the seconds during which some bulk job was still in the broker
    (``queued``: per bulk job, submitted until a worker took it), and the rest of the backlog's seconds, when every
    waiting bulk job had already been taken by a worker (reserved in a task slot or waiting in its engine), so an
    idle worker had nothing it could take."""
    backlog, broker = merge(waits), merge(queued)
    taken = subtract(backlog, broker)
    split = []
    for part in (subtract(backlog, taken), taken):  # backlog within the broker's seconds, and the rest
        span = sum(end - start for start, end in part)
        used = sum(overlap(merge(calls), part) for calls in busy.values())
        split.append(BacklogUtilization(span, used, workers * span))
    return split[0], split[1]


def load_wait(span: Interval, loads: Iterable[Interval]) -> float:
    """Seconds of a job's ``span`` (from reaching its worker's engine to its steps beginning) during which its
    model was loading on that worker (``loads``: the model's loads there, in its own call or beside the engine).
    The same measure for both ways of loading: a job that arrived while its model loaded waited for the load
    whichever call then ran it."""
    return overlap(merge([span]), merge(loads))
