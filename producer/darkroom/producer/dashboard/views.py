"""What each dashboard page shows, read from the fleet's Redis (and nothing written).

Sources: worker heartbeats (:mod:`darkroom.common.fleet`), the broker's queue lists and kombu's
``unacked`` hash, job records and their index (:mod:`darkroom.common.jobstore`), the augmentation
runs' hashes (:mod:`darkroom.common.augment_keys`) and the webhook dead letters.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis

from darkroom.common.augment_keys import AUGMENT_RUNS_KEY, augment_run_key
from darkroom.common.boundaries import ReferencePolicy
from darkroom.common.events import JobEvent
from darkroom.common.fleet import CATALOG_KEY, Fleet, WorkerInfo, parse_catalog
from darkroom.common.jobs import Priority
from darkroom.common.jobstore import JOBS_INDEX_KEY, JobRecord, JobStore, job_key
from darkroom.common.producers import job_namespace
from darkroom.common.queues import PRIORITY_STEPS, cold_queue, hot_queue, priority_keys
from darkroom.common.redaction import redact_parameters
from darkroom.common.status import JobStatus

from .._submission import owner
from ..webhooks.deliveries import DeadLetters, Delivery
from .auth import Role
from .media import Picture, input_object, input_visible, picture

__all__ = ["JobFilter", "JobRow", "Reader", "QueueRow", "RunRow", "Tile", "WorkerRow"]

UNACKED = "unacked"
"""kombu's Redis transport: delivered, unacknowledged messages (tag -> [message, exchange, routing key])."""
_PAGE = 200
_MAX_SCANNED = 5000
_INTERACTIVE, _BULK = Priority.INTERACTIVE.broker_priority, Priority.BULK.broker_priority


@dataclass(frozen=True)
class JobFilter:
    status: JobStatus | None = None
    model: str | None = None
    producer: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 100
    bound: bool = False  # ``producer`` is the visitor's own (a producer-bound viewer): its namespace too

    def matches(self, record: JobRecord) -> bool:
        return ((self.status is None or record.status is self.status)
                and (self.model is None or (record.job is not None and record.job.model == self.model))
                and (self.producer is None or self._owned(record, self.producer)))

    def _owned(self, record: JobRecord, producer: str) -> bool:
        """The job's producer (the one a worker verified, else its signer, else its field) is ``producer``."""
        if owner(record) != producer:
            return False
        return not self.bound or record.job_id.startswith(job_namespace(producer))


@dataclass(frozen=True)
class JobRow:
    record: JobRecord
    submitted: float
    progress: JobEvent | None
    thumb: Picture | None

    @property
    def prompt(self) -> str:
        prompts = self.record.job.prompts() if self.record.job is not None else []
        first = prompts[0] if prompts else ""
        return first if len(first) <= 80 else first[:79] + "…"


@dataclass(frozen=True)
class WorkerRow:
    name: str
    data: dict[str, Any]

    @property
    def heartbeat_at(self) -> float:
        return float(self.data.get("heartbeat_at") or 0)

    @property
    def current_jobs(self) -> list[str]:
        return [str(j.get("job_id")) for j in self.data.get("current_jobs", []) if isinstance(j, dict)]

    @property
    def adapters(self) -> dict[str, list[str]]:
        raw = self.data.get("resident_adapters") or {}
        return {str(m): [str(a) for a in names] for m, names in raw.items()}


@dataclass(frozen=True)
class QueueRow:
    model: str
    kind: str  # hot | cold
    queue: str
    by_priority: dict[int, int]
    in_flight: int

    @property
    def interactive(self) -> int:
        return self.by_priority.get(_INTERACTIVE, 0)

    @property
    def bulk(self) -> int:
        return self.by_priority.get(_BULK, 0)

    @property
    def other(self) -> int:
        return sum(n for p, n in self.by_priority.items() if p not in (_INTERACTIVE, _BULK))

    @property
    def waiting(self) -> int:
        return sum(self.by_priority.values())


@dataclass(frozen=True)
class RunRow:
    run_id: str
    started: float
    fields: dict[str, str]

    def number(self, name: str) -> int:
        try:
            return int(float(self.fields.get(name) or 0))
        except ValueError:
            return 0

    @property
    def finished_cells(self) -> int:
        return self.number("done") + self.number("failed")

    @property
    def percent(self) -> float:
        total = self.number("total")
        return 100.0 * self.finished_cells / total if total else 0.0

    @property
    def per_minute(self) -> float | None:
        try:
            elapsed = float(self.fields.get("updated_at") or 0) - float(self.fields.get("started_at") or self.started)
        except ValueError:
            return None
        return 60.0 * self.finished_cells / elapsed if elapsed > 0 else None

    @property
    def eta_seconds(self) -> float | None:
        rate, left = self.per_minute, self.number("total") - self.finished_cells
        return 60.0 * left / rate if rate and left > 0 else None


@dataclass(frozen=True)
class Tile:
    record: JobRecord
    picture: Picture


@dataclass
class QueuesView:
    rows: list[QueueRow] = field(default_factory=list)
    submitted_last_minute: int = 0
    submitted_last_5_minutes: int = 0
    webhooks: dict[str, int] = field(default_factory=dict)


class Reader:
    """Reads what the pages show. Sync (pages render in Starlette's thread pool); never writes."""

    def __init__(self, client: redis.Redis, *, ttl_seconds: int, references: ReferencePolicy | None = None) -> None:
        self.redis = client
        self.references = references or ReferencePolicy()  # which job inputs may be shown at all
        self.jobs = JobStore(client, ttl_seconds=ttl_seconds)
        self.fleet_reader = Fleet(client, ttl=0)
        self.dead = DeadLetters(client)

    # -- fleet and queues --------------------------------------------------
    def fleet(self) -> list[WorkerRow]:
        return [WorkerRow(w.name, w.data) for w in self._workers()]

    def models(self) -> list[str]:
        """Models the fleet serves now or served in the last week."""
        served = {m for w in self._workers() for m in w.models}
        return sorted(served | set(parse_catalog(self.redis.hgetall(CATALOG_KEY))))

    def queues(self) -> QueuesView:
        models = self.models()
        queues = [(m, kind, name) for m in models for kind, name in (("hot", hot_queue(m)), ("cold", cold_queue(m)))]
        pipe = self.redis.pipeline(transaction=False)
        for key in (key for _, _, name in queues for key in priority_keys(name)):
            pipe.llen(key)
        lengths = pipe.execute() if queues else []
        flying = self._in_flight()
        step = len(PRIORITY_STEPS)
        view = QueuesView()
        for i, (model, kind, name) in enumerate(queues):
            counts = {p: int(n) for p, n in zip(PRIORITY_STEPS, lengths[i * step:(i + 1) * step], strict=True) if n}
            view.rows.append(QueueRow(model, kind, name, counts, flying.get(name, 0)))
        now = time.time()
        view.submitted_last_minute = int(self.redis.zcount(JOBS_INDEX_KEY, now - 60, "+inf"))
        view.submitted_last_5_minutes = int(self.redis.zcount(JOBS_INDEX_KEY, now - 300, "+inf"))
        view.webhooks = self.dead.counts()
        return view

    def _in_flight(self) -> dict[str, int]:
        """Delivered, unacknowledged task messages per queue (jobs a worker holds now)."""
        counts: dict[str, int] = {}
        for raw in self.redis.hvals(UNACKED):
            try:
                queue = str(json.loads(raw)[2])
            except (ValueError, IndexError, TypeError):
                continue
            counts[queue] = counts.get(queue, 0) + 1
        return counts

    def _workers(self) -> list[WorkerInfo]:
        return self.fleet_reader.workers(fresh=True)

    # -- jobs ------------------------------------------------------------
    def job_rows(self, wanted: JobFilter, role: Role) -> tuple[list[JobRow], int]:
        """Jobs matching ``wanted``, newest first, and how many records were looked at."""
        rows: list[JobRow] = []
        scanned = offset = 0
        while len(rows) < wanted.limit and scanned < _MAX_SCANNED:
            page = self.jobs.recent(since=wanted.since, until=wanted.until, offset=offset, count=_PAGE)
            if not page:
                break
            offset += len(page)
            scanned += len(page)
            records = self.jobs.get_many([job_id for job_id, _ in page])
            matched = [(r, t) for r, (_, t) in zip(records, page, strict=True) if r is not None and wanted.matches(r)]
            rows += self._rows(matched[: wanted.limit - len(rows)], role)
        return rows, scanned

    def _rows(self, matched: list[tuple[JobRecord, float]], role: Role) -> list[JobRow]:
        running = [r.job_id for r, _ in matched if r.status is JobStatus.STARTED]
        progress = dict(zip(running, self._progress(running), strict=True))
        rows = []
        for record, submitted in matched:
            thumb = None
            if record.result is not None and record.result.outputs:
                thumb = picture(record.job_id, record.result.outputs[0], role)
            rows.append(JobRow(record, submitted, progress.get(record.job_id), thumb))
        return rows

    def _progress(self, job_ids: list[str]) -> list[JobEvent | None]:
        raws = self.redis.mget([job_key(j) + ":progress" for j in job_ids]) if job_ids else []
        return [None if raw is None else JobEvent.model_validate_json(raw) for raw in raws]

    def job(self, job_id: str, role: Role) -> JobDetail | None:
        record = self.jobs.get(job_id)
        if record is None:
            return None
        outputs = [picture(job_id, o, role) for o in record.result.outputs] if record.result else []
        webhooks = [d for d in self.dead.entries() if d.job_id == job_id]
        shown = input_object(record, role, self.references) is not None
        return JobDetail(record, self.jobs.history(job_id), self.jobs.progress(job_id), outputs, shown, webhooks,
                         "" if shown else "input flagged" if not input_visible(record, role) else "input not shown")

    def gallery(self, role: Role, limit: int = 60, producer: str | None = None) -> list[Tile]:
        """The newest outputs of succeeded jobs, as thumbnails (hidden where the role may not see them); only
        ``producer``'s (a producer-bound viewer's) when given."""
        tiles: list[Tile] = []
        wanted = JobFilter(status=JobStatus.SUCCEEDED, limit=limit, producer=producer, bound=producer is not None)
        rows, _ = self.job_rows(wanted, role)
        for row in rows:
            if row.record.result is None:  # a record written by hand or by an older version: nothing to show
                continue
            tiles += [Tile(row.record, picture(row.record.job_id, o, role)) for o in row.record.result.outputs]
            if len(tiles) >= limit:
                break
        return tiles[:limit]

    # -- augmentation runs and webhooks ----------------------------------------
    def runs(self, limit: int = 50) -> list[RunRow]:
        found: list[tuple[bytes, float]] = self.redis.zrevrange(  # type: ignore[assignment]
            AUGMENT_RUNS_KEY, 0, limit - 1, withscores=True)
        pipe = self.redis.pipeline(transaction=False)
        for run_id, _ in found:
            pipe.hgetall(augment_run_key(_text(run_id)))
        hashes = pipe.execute() if found else []
        return [RunRow(_text(run_id), float(score), {_text(k): _text(v) for k, v in fields.items()})
                for (run_id, score), fields in zip(found, hashes, strict=True) if fields]

    def dead_webhooks(self) -> list[Delivery]:
        return list(reversed(self.dead.entries()))

    # -- live updates ----------------------------------------------------
    def digests(self) -> dict[str, str]:
        """A fingerprint per live view; the dashboard tells browsers to refresh a view when its one changes."""
        fleet = [{k: v for k, v in w.data.items() if k not in ("heartbeat_at", "free_memory")}
                 for w in self._workers()]
        queues = self.queues()
        queue_state = [(q.queue, sorted(q.by_priority.items()), q.in_flight) for q in queues.rows]
        runs = [(r.run_id, sorted(r.fields.items())) for r in self.runs()]
        return {"fleet": _digest(fleet), "queues": _digest([queue_state, queues.webhooks]), "augment": _digest(runs),
                "webhooks": _digest(queues.webhooks)}


@dataclass(frozen=True)
class JobDetail:
    record: JobRecord
    history: list[dict[str, Any]]
    progress: JobEvent | None
    outputs: list[Picture]
    show_input: bool
    dead_webhooks: list[Delivery]
    input_hidden: str = ""  # why the input is not shown: flagged, or outside what the dashboard may read

    @property
    def parameters(self) -> dict[str, Any]:
        if self.record.result is not None:
            return redact_parameters(self.record.result.parameters)
        if self.record.job is None:  # a message that could not be read as a job
            return {"raw_job": self.record.raw_job}
        return redact_parameters(self.record.job.model_dump(mode="json", exclude_none=True))

    @property
    def timings(self) -> dict[str, float | None]:
        source = self.record.result.timings if self.record.result else (
            self.record.details.timings if self.record.details else None)
        return {} if source is None else source.model_dump()

    @property
    def created(self) -> datetime:
        return self.record.created_at


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
