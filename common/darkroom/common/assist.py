"""Assist: an idle worker joins the holders of a model whose hot queue is deeper than its holders can take.

Routing sends a model's jobs to its hot queue while any worker holds the model, and only holders consume
it, so a bulk flood for one model keeps its few holders busy while the rest of the fleet idles. Each idle
worker therefore looks, every ``assist_interval_seconds``, at the hot queues of the models it serves:
the messages no holder has reserved yet (every priority) plus the model's held fair-share backlog. A model
whose backlog is at least ``assist_queue_depth`` deep, that some worker holds, and that fits in the
worker's free memory budget without evicting anything (its size estimated as the smallest resident bytes
of a worker holding it) is a candidate; the deepest candidate first. The worker then claims one helper
place in Redis: a model has ``backlog // assist_queue_depth`` places at a time, and no more than keep the
backlog's drain at least one model load long (from the load and per-image seconds its holders report), so
a fleet of idle workers does not stampede onto a flood it would drain before their loads end; workers
loading it first (``WorkerReport.assist_loading``) count against both bounds. With a place, the worker
consumes the model's hot queue at once and its first job cold-loads the model (if no job comes within
``assist_hold_seconds``, it stops); with ``assist_load_first`` an eager worker loads the model first,
beside its engine, and consumes its hot queue once it is resident (the jobs stay in the broker meanwhile).
From then on it is a holder like any other.

The policy knows nothing of model families: only queue depths, memory bytes and the fleet's reports.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass

import redis

from .fairness import backlog_key
from .fleet import WorkerInfo
from .queues import PRIORITY_STEPS, hot_queue, priority_keys

__all__ = ["Candidate", "candidates", "claim", "helper_places", "hot_backlogs", "assist_key"]

_CLAIM = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if n > tonumber(ARGV[1]) then
  redis.call('DECR', KEYS[1])
  return 0
end
return n
"""


def assist_key(model_id: str) -> str:
    """Helper places taken on ``model_id`` lately (a counter that expires)."""
    return f"darkroom:assist:{model_id}"


@dataclass(frozen=True)
class Candidate:
    model: str
    backlog: int  # messages waiting that no holder has reserved (hot queue, every priority, plus held bulk)
    holders: int
    places: int  # helpers the backlog is worth (:func:`helper_places`)


def hot_backlogs(client: redis.Redis, models: Iterable[str]) -> dict[str, int]:
    """Per model: messages in its hot queue (every priority) plus its held fair-share backlog; one round trip."""
    models = list(models)
    pipe = client.pipeline(transaction=False)
    for model in models:
        for key in priority_keys(hot_queue(model)):
            pipe.llen(key)
        pipe.llen(backlog_key(model))
    counts = [int(n) for n in pipe.execute()]
    step = len(PRIORITY_STEPS) + 1
    return {model: sum(counts[i * step:(i + 1) * step]) for i, model in enumerate(models)}


def candidates(backlogs: dict[str, int], workers: list[WorkerInfo], *, me: str, free_bytes: int,
               queue_depth: int, work_per_load: float = 1.0) -> list[Candidate]:
    """Models this worker may help with, deepest backlog first (a pure decision; see the module docs).

    ``backlogs``: from :func:`hot_backlogs`; ``workers``: the fleet's reports; ``me``: this worker's name (a
    model it holds is not a candidate); ``free_bytes``: its memory budget minus its resident bytes;
    ``queue_depth``: backlog per helper place (``assist_queue_depth``); ``work_per_load``: see
    :func:`helper_places` (``assist_work_per_load``).
    """
    found = []
    for model, depth in backlogs.items():
        if depth < queue_depth:
            continue
        holders = [w for w in workers if model in w.resident_models]
        if not holders or any(w.name == me for w in holders):
            continue  # resident nowhere: the sweep moves its jobs to the cold queue, which every worker reads
        size = min(w.report.resident_bytes for w in holders)
        if size <= 0 or size > free_bytes:
            continue  # size unknown, or it would evict a model of ours: leave it to the holders
        # helpers loading it first take none of the backlog until they hold it, but they will: count them in
        loading = sum(1 for w in workers if w.report.assist_loading == model and model not in w.resident_models)
        places = helper_places(model, depth, holders, queue_depth, work_per_load, loading=loading)
        if places > 0:
            found.append(Candidate(model, depth, len(holders), places))
    return sorted(found, key=lambda c: (-c.backlog / c.holders, c.model))


def helper_places(model: str, backlog: int, holders: list[WorkerInfo], queue_depth: int,
                  work_per_load: float = 1.0, loading: int = 0) -> int:
    """How many more workers are worth a load of ``model`` for ``backlog`` waiting messages.

    At most one per ``queue_depth`` messages; and where the holders report the model's times (load seconds
    *l*, pipeline seconds per image *i*), no more than give each worker, holders and helpers alike, at least
    ``work_per_load`` loads' worth of the backlog's work: ``backlog × i ÷ (work_per_load × l) − holders``.
    At 1.0 a helper's load never outlasts its share of the drain; below 1.0 more idle workers load the
    model, which drains a flood sooner (while the holders alone would take longer than a load, every
    helper shortens it) at the price of more loads per job.

    ``loading``: workers loading the model first to help with it (they read its queue once it is resident, so
    the backlog does not shrink for them yet); they count against both bounds.
    """
    places = backlog // queue_depth - loading
    times = [t for t in (w.report.model_times.get(model) for w in holders) if t is not None]
    loads = [t.load_seconds for t in times if t.load_seconds > 0]
    images = [t.image_seconds for t in times if t.image_seconds]
    if loads and images:
        worth = int(backlog * statistics.median(images) / (work_per_load * statistics.median(loads))) \
            - len(holders) - loading
        places = min(places, worth)
    return max(0, places)


def claim(client: redis.Redis, candidate: Candidate, ttl_seconds: float) -> bool:
    """Take one of the candidate model's helper places for ``ttl_seconds`` (False: all taken lately)."""
    taken = client.eval(_CLAIM, 1, assist_key(candidate.model), candidate.places,
                        max(1, int(ttl_seconds * 1000)))
    return bool(taken)
