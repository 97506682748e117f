"""Fleet simulation: N real ``darkroom worker --simulate`` processes on one box, two routing policies.

    .venv/bin/python bench/fleet_sim.py [--workers 50] [--jobs 1500] [--time-scale 8] [--load 0.8]
                                        [--policies darkroom,baseline] [--scale] [--json out.json]

Starts its own embedded Redis and S3 server, writes a simulation profile (30 models with Zipf popularity and
sizes, 500 LoRAs), starts ``--workers`` simulated workers (each preloads one model, drawn in proportion to
popularity, the same for both policies) and replays one workload on each policy:

- an interactive stream (Poisson, ``--interactive-share`` of the jobs, one job at a time with ``submit``) and
- bulk floods (``submit_many`` of ``--flood`` jobs for one model, at regular intervals),

offered at ``--load`` x the fleet's batch-1 capacity. Policies:

``darkroom``  the SDK's own routing: a model's hot queue while some worker holds it, else its cold queue;
              workers consume the hot queues of their resident models, then every cold queue.
``spill``     darkroom's routing, but once a model's hot queue holds ``--spill`` jobs per worker holding the
              model, further jobs go to its cold queue, where any worker may take them (and load the model).
``static``    darkroom's routing with assist off (``DARKROOM_ASSIST=false``: no idle worker joins a flood's
              holders), i.e. hot/cold routing alone.
``nohold``    darkroom with ``DARKROOM_INTERACTIVE_HOLD_MS=0``: after a call, a ready bulk batch never waits for
              interactive jobs that wait in the broker.
``loadfirst`` darkroom with ``DARKROOM_ASSIST_LOAD_FIRST=true``: a worker that comes to help with a flood loads
              its model first and takes its jobs once it is resident (by default it takes a call's worth at
              once, and they wait out the load in its task slots).
``inline``    darkroom with ``DARKROOM_LOAD_BESIDE=false``: a model loads on the engine thread, which serves
              nothing else meanwhile.
``assist=R``  darkroom with ``DARKROOM_ASSIST_WORK_PER_LOAD=R`` (default 1.0): idle workers keep joining a
              flood while each worker's share of its work is at least R model loads (e.g. ``assist=0.25``);
              ``assist=R/D`` also sets ``DARKROOM_ASSIST_QUEUE_DEPTH=D`` (waiting messages per helper, default 4).
``slots=N``   darkroom with ``DARKROOM_TASK_SLOTS=N`` (default: twice the largest batch): how many jobs a worker
              takes from the broker at once, its call's and the next call's.
``baseline``  one shared queue per model (its cold queue, consumed by every worker), LRU residency: a worker
              takes whatever job comes next and loads its model if needed, on its engine thread (what Ray
              Serve's model multiplexing does without its routing hint).

Printed per policy: hot-hit rate (jobs that did not wait for their model to load on their worker, in their own
call or beside the engine while they waited in it), cold loads and adapter
loads per 1,000 jobs, interactive queue wait p50/p99 (wall seconds, and / one batch-1 call), interactive wait
until the job's call began and until its steps began less the part of its own model's load it waited for
("behind other work": the queue, other jobs' calls and other models' loads; a model nobody holds must load
first, a cold start rather than a wait), bulk-backlog
utilization (while some bulk job waited, submitted and its call not begun: busy worker-seconds, in calls or model
loads, over the fleet's worker-seconds; the issue's "bulk throughput / ideal"), bulk jobs/s over the fleet's
batch-1 capacity (bounded by the arrival rate: it measures the workload as much as the fleet), the planned and
achieved arrival rates (the submitter can fall behind on a busy box) and memory per worker.

Times: the profile's timings are multiplied by ``--time-scale`` (> 1 slows the simulated GPUs down so that the
Redis, S3 and Celery work of 50 workers fits on a small box); figures in seconds are wall seconds, ratios
do not depend on the scale. Inputs are 64x64 PNGs standing for 512x512 images (the profile's step time is
keyed to them) so that encoding and upload stay cheap.

``--scale`` replays the KEDA formula of ``infra/k8s/base/keda-sd15.yaml`` on the live queue lengths of the
whole fleet: desired = ceil((queued + in flight) / target), at most +4 workers per 60 s, scale-down after a
600 s window (both divided by the time scale's speed-up, see ``--keda-time``), between ``--min-workers`` and
``--workers``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from darkroom.common.queues import cold_queue, hot_queue, priority_keys
from darkroom.dev.fleetstats import backlog_split, backlog_utilization, load_wait
from darkroom.dev.process import WorkerProcess
from darkroom.producer.client import Client

GB = 10**9
STEPS = 20
STRENGTH = 0.75  # 15 of 20 steps run
STEP_SECONDS = {1: 0.05, 2: 0.08, 4: 0.14, 8: 0.26}  # assumed SD1.5-class fp16 on a 24 GB GPU, 512x512
PROFILE_SIZE = "64x64"  # inputs stand for 512x512 (see the module docs)
KINDS = [("sd15", 2.1 * GB, 3.0), ("sdxl", 6.9 * GB, 8.0)]  # bytes, load seconds (from local disk)


# -- workload ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arrival:
    at: float  # seconds after the start (wall)
    priority: str
    jobs: tuple[tuple[str, str | None], ...]  # (model, lora uri or None)


@dataclass
class Workload:
    models: list[tuple[str, int, float]]  # id, bytes, load seconds
    popularity: list[float]
    loras: dict[str, list[str]]
    arrivals: list[Arrival]
    preload: list[str]  # per worker

    @property
    def jobs(self) -> int:
        return sum(len(a.jobs) for a in self.arrivals)


def zipf(n: int, s: float) -> list[float]:
    weights = [1 / (i + 1) ** s for i in range(n)]
    total = sum(weights)
    return [w / total for w in weights]


def build_workload(args: argparse.Namespace) -> Workload:
    rng = random.Random(args.seed)
    models = []
    for i in range(args.models):
        kind, nbytes, load = KINDS[1] if rng.random() < args.xl_share else KINDS[0]
        models.append((f"{kind}-{i:02d}", int(nbytes * rng.uniform(0.9, 1.1)), load * rng.uniform(0.8, 1.3)))
    popularity = zipf(args.models, args.zipf)
    ids = [m[0] for m in models]
    loras: dict[str, list[str]] = {m: [] for m in ids}
    for k in range(args.loras):  # LoRAs belong to models in proportion to popularity
        model = rng.choices(ids, popularity)[0]
        loras[model].append(f"s3://darkroom/loras/{model}/style-{k:03d}.safetensors")
    lora_pop = {m: zipf(len(v), args.zipf) for m, v in loras.items() if v}

    def pick(model: str | None = None) -> tuple[str, str | None]:
        model = model or rng.choices(ids, popularity)[0]
        lora = None
        if loras[model] and rng.random() < args.lora_share:
            lora = rng.choices(loras[model], lora_pop[model])[0]
        return model, lora

    batch1 = STEP_SECONDS[1] * STEPS * STRENGTH * args.time_scale
    rate = args.load * args.workers / batch1  # jobs/s offered
    duration = args.jobs / rate
    arrivals: list[Arrival] = []
    interactive = round(args.jobs * args.interactive_share)
    t = 0.0
    for _ in range(interactive):
        t += rng.expovariate(interactive / duration)
        arrivals.append(Arrival(min(t, duration), "interactive", (pick(),)))
    bulk = args.jobs - interactive
    floods = max(1, math.ceil(bulk / args.flood))
    for f in range(floods):
        size = min(args.flood, bulk - f * args.flood)
        model = rng.choices(ids, popularity)[0]
        arrivals.append(Arrival(duration * f / floods, "bulk", tuple(pick(model) for _ in range(size))))
    arrivals.sort(key=lambda a: a.at)
    # each worker preloads one model, in proportion to popularity (largest remainder)
    quota = [p * args.workers for p in popularity]
    counts = [int(q) for q in quota]
    for i in sorted(range(len(quota)), key=lambda i: quota[i] - counts[i], reverse=True)[: args.workers - sum(counts)]:
        counts[i] += 1
    preload = [m for m, c in zip(ids, counts, strict=True) for _ in range(c)]
    rng.shuffle(preload)
    return Workload(models, popularity, loras, arrivals, preload)


def profile_for(args: argparse.Namespace, workload: Workload) -> dict[str, Any]:
    return {
        "name": "fleet-sim-sd", "time_scale": args.time_scale, "memory_budget_bytes": int(args.budget_gb * GB),
        "adapter_load_seconds": 0.25, "default_model": {"bytes": int(2.1 * GB), "load_seconds": 3.0},
        "models": {m: {"bytes": b, "load_seconds": round(s, 2)} for m, b, s in workload.models},
        "step_seconds": {PROFILE_SIZE: {str(k): v for k, v in STEP_SECONDS.items()}},
    }


# -- fleet ---------------------------------------------------------------------------------------------------
def pss_bytes(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process from /proc (PSS shares library pages fairly between processes)."""
    rss = pss = 0
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
    return rss, pss


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class Fleet:
    env: dict[str, str]
    profile: Path
    logs: Path
    workers: list[WorkerProcess] = field(default_factory=list)
    worker_seconds: float = 0.0  # integrated over time (scaling)
    _since: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def spawn(self, preload: list[str]) -> list[WorkerProcess]:
        made = [WorkerProcess(f"sim-{uuid.uuid4().hex[:8]}",
                              ["--simulate", str(self.profile), "--preload-model", model, "--log-level", "warning"],
                              env=self.env, redis_url=self.env["DARKROOM_REDIS_URL"],
                              log_path=self.logs / f"{len(self.workers) + i:03d}.log")
                for i, model in enumerate(preload)]
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(lambda w: w.start(timeout=600), made))
        with self._lock:
            self._account()
            self.workers.extend(made)
        return made

    def retire(self, count: int) -> None:
        with self._lock:
            self._account()
            leaving, self.workers = self.workers[:count], self.workers[count:]
        for worker in leaving:  # warm shutdown: running jobs finish
            threading.Thread(target=worker.stop, args=(600,), daemon=True).start()

    def _account(self) -> None:
        now = time.monotonic()
        self.worker_seconds += len(self.workers) * (now - self._since)
        self._since = now

    def settle(self) -> float:
        with self._lock:
            self._account()
            return self.worker_seconds

    def stop(self) -> None:
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(lambda w: w.stop(60), self.workers))
        self.workers = []


def queued(client: Client, models: list[str], *, hot_only: bool = False) -> int:
    pipe = client.jobs.redis.pipeline(transaction=False)
    for model in models:
        for queue in (hot_queue(model),) if hot_only else (hot_queue(model), cold_queue(model)):
            for key in priority_keys(queue):
                pipe.llen(key)
    return sum(int(n) for n in pipe.execute())


class Keda:
    """The ScaledObject's formula on the whole fleet: ceil((queued + in flight) / target), HPA behaviour scaled."""

    def __init__(self, fleet: Fleet, client: Client, workload: Workload, args: argparse.Namespace) -> None:
        self.fleet, self.client, self.workload, self.args = fleet, client, workload, args
        self.speed = args.keda_time  # KEDA's seconds per wall second
        self.stop_event = threading.Event()
        self.trace: list[tuple[float, int, int]] = []
        self.rng = random.Random(args.seed + 1)
        self.starting = 0
        self._spawning: list[threading.Thread] = []
        self._runner: threading.Thread | None = None

    def start(self, started: float) -> None:
        self._runner = threading.Thread(target=self.run, args=(started,), daemon=True)
        self._runner.start()

    def stop(self) -> None:
        """Stop scaling and wait for the workers still starting, so that the fleet's stop covers them too."""
        self.stop_event.set()
        if self._runner is not None:
            self._runner.join()
        for thread in self._spawning:
            thread.join()

    def _start(self, preload: list[str]) -> None:
        try:
            self.fleet.spawn(preload)
        finally:
            self.starting -= len(preload)

    def run(self, started: float) -> None:
        last_up = -1e9
        above_since: float | None = None
        ids = [m[0] for m in self.workload.models]
        while not self.stop_event.wait(10 / self.speed):  # pollingInterval: 10 s
            in_flight = sum(len(w.report.current_jobs) for w in self.client.fleet.workers(fresh=True))
            desired = math.ceil((queued(self.client, ids) + in_flight) / 1)
            desired = max(self.args.min_workers, min(self.args.workers, desired))
            now = time.monotonic()
            current = len(self.fleet.workers) + self.starting  # pods being created count, as for the HPA
            self.trace.append((round(now - started, 1), current, desired))
            if desired > current and now - last_up >= 60 / self.speed:
                last_up = now
                add = min(4, desired - current)  # scaleUp policy: 4 pods per 60 s
                preload = self.rng.choices(ids, self.workload.popularity, k=add)
                self.starting += add
                thread = threading.Thread(target=self._start, args=(preload,), daemon=True)
                self._spawning.append(thread)
                thread.start()
                above_since = None
            elif desired < current:
                above_since = above_since or now
                if now - above_since >= 600 / self.speed:  # stabilizationWindowSeconds: 600, 1 pod / 120 s
                    self.fleet.retire(1)
                    above_since = now - 600 / self.speed + 120 / self.speed
            else:
                above_since = None


# -- one policy ----------------------------------------------------------------------------------------------
def run_policy(policy: str, args: argparse.Namespace, workload: Workload, env: dict[str, str], settings: Any,
               folder: Path) -> dict[str, Any]:
    profile = folder / "profile.json"
    profile.write_text(json.dumps(profile_for(args, workload)))
    if policy == "static":
        env = {**env, "DARKROOM_ASSIST": "false"}
    if policy == "nohold":
        env = {**env, "DARKROOM_INTERACTIVE_HOLD_MS": "0"}
    if policy == "loadfirst":
        env = {**env, "DARKROOM_ASSIST_LOAD_FIRST": "true"}
    if policy in ("inline", "baseline"):
        env = {**env, "DARKROOM_LOAD_BESIDE": "false"}
    if policy.startswith("slots="):
        env = {**env, "DARKROOM_TASK_SLOTS": policy.partition("=")[2]}
    if policy.startswith("assist="):
        ratio, _, depth = policy.partition("=")[2].partition("/")
        env = {**env, "DARKROOM_ASSIST_WORK_PER_LOAD": ratio, **({"DARKROOM_ASSIST_QUEUE_DEPTH": depth} if depth else {})}
    fleet = Fleet(env, profile, folder / policy / "logs")
    client = Client(settings)
    client.jobs.redis.flushall()
    client.fleet.register_models([m[0] for m in workload.models])
    hot = {"hot": 0, "all": 0}
    route = client.fleet.queue_for

    def darkroom_route(model: str) -> str:
        queue = route(model)
        hot["all"] += 1
        hot["hot"] += queue == hot_queue(model)
        return queue

    room: dict[str, int] = {}  # spill: jobs the hot queue of a model may still take in this arrival

    def spill_route(model: str) -> str:
        queue = darkroom_route(model)
        if queue != hot_queue(model):
            return queue
        if model not in room:
            holders = max(1, len(client.fleet.holders(model)))
            depth = queued(client, [model], hot_only=True)
            room[model] = args.spill * holders - depth
        room[model] -= 1
        return queue if room[model] >= 0 else cold_queue(model)

    client.fleet.queue_for = {"darkroom": darkroom_route, "static": darkroom_route,  # type: ignore[method-assign,assignment]
                              "spill": spill_route,
                              "baseline": cold_queue}.get(policy, darkroom_route)
    print(f"[{policy}] starting {args.workers} simulated workers ...", file=sys.stderr)
    t0 = time.monotonic()
    fleet.spawn(workload.preload)
    startup = time.monotonic() - t0
    memory = [pss_bytes(w.pid) for w in fleet.workers]
    from darkroom.dev.demo import sample_image

    buffer = io.BytesIO()
    sample_image(64).save(buffer, format="PNG")
    image = client.upload(buffer.getvalue(), f"s3://darkroom/inputs/{uuid.uuid4().hex}.png")
    submitted: dict[str, tuple[str, float]] = {}
    keda = Keda(fleet, client, workload, args) if args.scale else None
    if keda is not None:
        fleet.retire(len(fleet.workers) - args.min_workers)
    print(f"[{policy}] {len(fleet.workers)} workers up in {startup:.0f} s; replaying {workload.jobs} jobs over "
          f"{workload.arrivals[-1].at:.0f} s ...", file=sys.stderr)
    started = time.monotonic()
    fleet.settle()
    if keda is not None:
        keda.start(started)
    lag = 0.0  # the most an arrival was submitted after its planned time (the submitter fell behind)
    for arrival in workload.arrivals:
        delay = started + arrival.at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        lag = max(lag, -delay)
        jobs = [{"model": m, "image": image, "prompt": "a harbour at dawn", "strength": STRENGTH,
                 "num_inference_steps": STEPS, "guidance_scale": 7.0, "priority": arrival.priority,
                 **({"adapters": [{"uri": lora, "weight": 1.0}]} if lora else {})} for m, lora in arrival.jobs]
        room.clear()
        handles = [client.submit(jobs[0])] if arrival.priority == "interactive" else client.submit_many(jobs)
        now = time.monotonic()
        for h in handles:
            submitted[h.job_id] = (arrival.priority, now)
    submit_span = time.monotonic() - started
    records = wait_all(client, list(submitted), timeout=args.timeout)
    ended = time.monotonic()
    if keda is not None:
        keda.stop()
    worker_seconds = fleet.settle()
    reports = {w.name: w.report for w in client.fleet.workers(fresh=True)}
    fleet.stop()
    client.close()
    figures = summarize(records, submitted, args, ended - started, worker_seconds, hot, policy)
    planned = workload.arrivals[-1].at
    figures.update({
        "arrival_rate_planned": round(workload.jobs / planned, 2) if planned else None,
        "arrival_rate_achieved": round(len(submitted) / submit_span, 2) if submit_span else None,
        "submit_lag_max_s": round(lag, 1),
        "workers": args.workers, "startup_seconds": round(startup, 1),
        "worker_rss_mb": round(statistics.mean(r for r, _ in memory) / 2**20, 1),
        "worker_pss_mb": round(statistics.mean(p for _, p in memory) / 2**20, 1),
        "evictions": sum(r.cache.evictions for r in reports.values()),
        "keda_trace": keda.trace if keda is not None else None,
    })
    return figures


def wait_all(client: Client, ids: list[str], timeout: float) -> list[Any]:
    deadline = time.monotonic() + timeout
    pending = set(ids)
    done: dict[str, Any] = {}
    while pending and time.monotonic() < deadline:
        batch = list(pending)
        for record in client.jobs.get_many(batch):
            if record is not None and record.status.is_terminal:
                done[record.job_id] = record
                pending.discard(record.job_id)
        if pending:
            time.sleep(1.0)
    if pending:
        print(f"warning: {len(pending)} jobs not finished after {timeout:.0f} s", file=sys.stderr)
    return list(done.values())


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summarize(records: list[Any], submitted: dict[str, tuple[str, float]], args: argparse.Namespace,
              elapsed: float, worker_seconds: float, hot: dict[str, int], policy: str) -> dict[str, Any]:
    ok = [r for r in records if r.result is not None]
    n = max(1, len(ok))
    sims = [r.result.parameters.get("sim", {}) for r in ok]
    model_loads = sum(s.get("model_loads", 0) for s in sims)
    adapter_loads = sum(s.get("adapter_loads", 0) for s in sims)
    busy = sum(s.get("call_seconds", 0.0) for s in sims)
    loading = sum(s.get("load_seconds", 0.0) for s in sims)
    # a hit: the job did not wait for its model to load on its worker (in its own call, or beside the engine while
    # it waited in the engine); from each job's span in the engine and its worker's loads of the model
    loads_of: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r, s in zip(ok, sims, strict=True):
        if s.get("first") and s.get("model_loads") and "busy_from" in s:
            span = (s["load_from"], s["load_to"]) if "load_from" in s else \
                (s["busy_from"], s["busy_from"] + s.get("load_seconds", 0.0))
            loads_of.setdefault((r.result.worker, r.result.model), []).append(span)

    def own_load_wait(r: Any, s: dict[str, Any]) -> float:
        if "denoise_from" not in s:  # a record without the call's span: what the job reported
            return r.result.timings.model_load or 0.0
        return load_wait((s["busy_from"] - (r.result.timings.batch_wait or 0.0), s["denoise_from"]),
                         loads_of.get((r.result.worker, r.result.model), []))

    own_loads = [own_load_wait(r, s) for r, s in zip(ok, sims, strict=True)]
    hits = sum(1 for wait in own_loads if wait < 0.5 * args.time_scale)
    interactive = [r.result.timings.queue_wait or 0.0 for r in ok if submitted[r.job_id][0] == "interactive"]
    # until its own call began: the queue wait plus the time its task slot waited in the worker's engine
    to_call = [(s["busy_from"] - r.created_at.timestamp(), r) for r, s in zip(ok, sims, strict=True)
               if submitted[r.job_id][0] == "interactive" and "busy_from" in s]
    for wait, r in sorted(to_call, key=lambda entry: -entry[0])[:5]:  # the worst, to see where they waited
        t = r.result.timings
        print(f"[{policy}] interactive {r.job_id}: {wait:.1f} s to its call (queue {t.queue_wait or 0.0:.1f}, "
              f"engine {t.batch_wait:.1f}, load {t.model_load:.1f}) on {r.result.worker}, model {r.result.model}, "
              f"call of {r.result.parameters.get('batch', {}).get('jobs', 1)} job(s)", file=sys.stderr)
    call_waits = [max(0.0, wait) for wait, _ in to_call]
    # until its steps began, less the part of its own model's load it waited for (a cold model's load is a cold
    # start, not a wait behind other work): queue, engine and other models' loads and calls
    behind = [max(0.0, s["denoise_from"] - r.created_at.timestamp() - own)
              for r, s, own in zip(ok, sims, own_loads, strict=True)
              if submitted[r.job_id][0] == "interactive" and "denoise_from" in s]
    batch1 = STEP_SECONDS[1] * STEPS * STRENGTH * args.time_scale
    full_batch = STEP_SECONDS[max(STEP_SECONDS)] * STEPS * STRENGTH * args.time_scale  # a call of the largest batch
    bulk = [r for r in ok if submitted[r.job_id][0] == "bulk"]
    bulk_window = 0.0
    if bulk:
        first = min(r.created_at for r in bulk)
        last = max(r.result.finished_at for r in bulk)
        bulk_window = (last - first).total_seconds()
    ideal_bulk_jobs_per_s = args.workers / batch1  # every worker busy at batch 1
    # bulk-backlog utilization: while some bulk job waits (submitted, its call not begun), busy worker-seconds
    # (calls and model loads, wall clock from the simulated executor) over the fleet's worker-seconds
    calls: dict[str, list[tuple[float, float]]] = {}
    pipeline: dict[str, list[tuple[float, float]]] = {}  # the calls without their model loads
    for r, s in zip(ok, sims, strict=True):
        if s.get("first") and "busy_from" in s:
            calls.setdefault(r.result.worker, []).append((s["busy_from"], s["busy_to"]))
            if "load_from" in s:  # a load beside the engine, before this call (other calls may overlap it)
                calls[r.result.worker].append((s["load_from"], s["load_to"]))
            pipeline.setdefault(r.result.worker, []).append((s["busy_to"] - s["call_seconds"], s["busy_to"]))
    waits = [(r.created_at.timestamp(), s["busy_from"]) for r, s in zip(ok, sims, strict=True)
             if submitted[r.job_id][0] == "bulk" and "busy_from" in s]
    backlog = backlog_utilization(waits, calls, args.workers)
    in_calls = backlog_utilization(waits, pipeline, args.workers).fraction
    # the same seconds split: some bulk job still in the broker (an idle worker could take it, if it read that
    # queue), or every waiting bulk job already taken by some worker (reserved, or waiting in its engine)
    queued_spans = [(r.created_at.timestamp(), r.created_at.timestamp() + (r.result.timings.queue_wait or 0.0))
                    for r in bulk]
    in_broker, taken = backlog_split(waits, queued_spans, calls, args.workers)
    return {
        "policy": policy, "jobs": len(records), "succeeded": len(ok),
        "failed": len(records) - len(ok), "unfinished": len(submitted) - len(records),
        "failed_codes": dict(Counter(r.error_code for r in records if r.result is None)),
        "hot_hit_rate": round(hits / n, 3),
        "routed_to_hot_queue": round(hot["hot"] / hot["all"], 3) if hot["all"] else None,
        "cold_loads_per_1000": round(1000 * model_loads / n, 1),
        "adapter_loads_per_1000": round(1000 * adapter_loads / n, 1),
        "interactive_wait_p50_s": round(pct(interactive, 0.5), 2),
        "interactive_wait_p99_s": round(pct(interactive, 0.99), 2),
        "interactive_p99_over_batch": round(pct(interactive, 0.99) / batch1, 2),
        "interactive_to_call_p50_s": round(pct(call_waits, 0.5), 2),
        "interactive_to_call_p99_s": round(pct(call_waits, 0.99), 2),
        "interactive_to_call_p99_over_batch": round(pct(call_waits, 0.99) / batch1, 2),
        "interactive_to_call_p99_over_full_batch": round(pct(call_waits, 0.99) / full_batch, 2),
        "interactive_behind_p50_s": round(pct(behind, 0.5), 2),
        "interactive_behind_p99_s": round(pct(behind, 0.99), 2),
        "interactive_behind_p99_over_batch": round(pct(behind, 0.99) / batch1, 2),
        "interactive_behind_p99_over_full_batch": round(pct(behind, 0.99) / full_batch, 2),
        "full_batch_seconds": round(full_batch, 2),
        "batch1_seconds": round(batch1, 2),
        "utilization": round(busy / worker_seconds, 3) if worker_seconds else None,
        "load_share": round(loading / worker_seconds, 3) if worker_seconds else None,
        "bulk_jobs_per_s": round(len(bulk) / bulk_window, 2) if bulk_window else None,
        "bulk_over_ideal": round(len(bulk) / bulk_window / ideal_bulk_jobs_per_s, 3) if bulk_window else None,
        "bulk_backlog_seconds": round(backlog.backlog_seconds, 1),
        "bulk_backlog_utilization": round(backlog.fraction, 3) if backlog.fraction is not None else None,
        "bulk_backlog_in_calls": round(in_calls, 3) if in_calls is not None else None,
        "bulk_backlog_broker_seconds": round(in_broker.backlog_seconds, 1),
        "bulk_backlog_broker_utilization": round(in_broker.fraction, 3) if in_broker.fraction is not None else None,
        "bulk_backlog_taken_seconds": round(taken.backlog_seconds, 1),
        "bulk_backlog_taken_utilization": round(taken.fraction, 3) if taken.fraction is not None else None,
        "elapsed_s": round(elapsed, 1), "worker_seconds": round(worker_seconds, 1),
    }


ROWS: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
        ("succeeded / jobs", lambda f: f"{f['succeeded']} / {f['jobs']}"),
        ("failed by code", lambda f: ",".join(f"{k}:{v}" for k, v in f["failed_codes"].items()) or "-"),
        ("hot-hit rate (no wait for its model's load)", lambda f: f["hot_hit_rate"]),
        ("routed to a hot queue", lambda f: f["routed_to_hot_queue"]),
        ("cold loads / 1000 jobs", lambda f: f["cold_loads_per_1000"]),
        ("adapter loads / 1000 jobs", lambda f: f["adapter_loads_per_1000"]),
        ("interactive wait p50 (s)", lambda f: f["interactive_wait_p50_s"]),
        ("interactive wait p99 (s)", lambda f: f["interactive_wait_p99_s"]),
        ("  p99 / one batch-1 call", lambda f: f["interactive_p99_over_batch"]),
        ("interactive wait until its call p50 / p99 (s)",
         lambda f: f"{f.get('interactive_to_call_p50_s')} / {f.get('interactive_to_call_p99_s')}"),
        ("  p99 / one batch-1 call", lambda f: f.get("interactive_to_call_p99_over_batch")),
        ("  p99 / one full batch call", lambda f: f.get("interactive_to_call_p99_over_full_batch")),
        ("interactive wait behind other work p50 / p99 (s)",
         lambda f: f"{f.get('interactive_behind_p50_s')} / {f.get('interactive_behind_p99_s')}"),
        ("  p99 / one batch-1 call", lambda f: f.get("interactive_behind_p99_over_batch")),
        ("  p99 / one full batch call", lambda f: f.get("interactive_behind_p99_over_full_batch")),
        ("busy / available GPU-s", lambda f: f["utilization"]),
        ("loading / available GPU-s", lambda f: f["load_share"]),
        ("bulk jobs/s", lambda f: f["bulk_jobs_per_s"]),
        ("bulk jobs/s / fleet capacity (bounded by arrivals)", lambda f: f["bulk_over_ideal"]),
        ("bulk backlog: seconds with bulk work waiting", lambda f: f["bulk_backlog_seconds"]),
        ("bulk-backlog utilization (busy / available while bulk work waits)",
         lambda f: f["bulk_backlog_utilization"]),
        ("  of which in pipeline calls (not loading)", lambda f: f.get("bulk_backlog_in_calls")),
        ("  while some bulk job is in the broker: seconds / utilization",
         lambda f: f"{f.get('bulk_backlog_broker_seconds')} / {f.get('bulk_backlog_broker_utilization')}"),
        ("  while all of it is taken by workers: seconds / utilization",
         lambda f: f"{f.get('bulk_backlog_taken_seconds')} / {f.get('bulk_backlog_taken_utilization')}"),
        ("arrivals jobs/s planned / achieved", lambda f: f"{f['arrival_rate_planned']} / {f['arrival_rate_achieved']}"),
        ("submitter lag, most (s)", lambda f: f["submit_lag_max_s"]),
        ("elapsed incl. drain (s)", lambda f: f["elapsed_s"]),
        ("evictions", lambda f: f["evictions"]),
        ("worker RSS / PSS (MB)", lambda f: f"{f['worker_rss_mb']} / {f['worker_pss_mb']}"),
        ("workers up in (s)", lambda f: f["startup_seconds"])]


def report(results: list[dict[str, Any]], args: argparse.Namespace, workload: Workload) -> str:
    head = ["metric"] + [r["policy"] for r in results]
    lines = [[label] + [str(get(r)) for r in results] for label, get in ROWS]
    widths = [max(len(row[i]) for row in [head, *lines]) for i in range(len(head))]
    out = [f"fleet_sim {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} CPUs, "
           f"{available_bytes() / 2**30:.1f} GiB available: {args.workers} workers, {args.models} models "
           f"(Zipf {args.zipf}), {args.loras} LoRAs, {workload.jobs} jobs at load {args.load}, time scale "
           f"{args.time_scale}, budget {args.budget_gb} GB per worker"]
    for row in [head, *lines]:
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    return "\n".join(out)


def _slots_policy(policy: str) -> bool:
    """Whether ``policy`` is ``slots=N`` with N >= 1."""
    name, _, value = policy.partition("=")
    return name == "slots" and value.isdigit() and int(value) >= 1


def _assist_policy(policy: str) -> bool:
    """Whether ``policy`` is ``assist=R`` or ``assist=R/D`` with 0 < R <= 100 and D >= 1."""
    name, _, value = policy.partition("=")
    ratio, _, depth = value.partition("/")
    try:
        return name == "assist" and 0 < float(ratio) <= 100 and (not depth or int(depth) >= 1)
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=50, help="simulated worker processes (about 84 MB each)")
    parser.add_argument("--jobs", type=int, default=1500, help="jobs per policy (interactive stream plus bulk floods)")
    parser.add_argument("--models", type=int, default=30, help="distinct models, Zipf-popular")
    parser.add_argument("--loras", type=int, default=500, help="distinct LoRAs, Zipf-popular")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of model and LoRA popularity")
    parser.add_argument("--xl-share", type=float, default=0.3, help="share of SDXL-sized models")
    parser.add_argument("--lora-share", type=float, default=0.4, help="share of jobs with a LoRA")
    parser.add_argument("--interactive-share", type=float, default=0.3, help="share of interactive jobs")
    parser.add_argument("--flood", type=int, default=0, help="jobs per bulk flood (default: 2 x workers)")
    parser.add_argument("--load", type=float, default=0.8, help="offered load / batch-1 capacity")
    parser.add_argument("--time-scale", type=float, default=8.0, help="multiplies every simulated time")
    parser.add_argument("--budget-gb", type=float, default=16.8, help="model memory per worker (70%% of 24 GB)")
    parser.add_argument("--policies", default="darkroom,baseline",
                        help="comma-separated: darkroom, baseline, static (darkroom without assist), nohold (darkroom "
                             "without the interactive hold), inline (darkroom loading models on the engine thread), "
                             "loadfirst (darkroom whose helpers load a flood's model before taking its jobs), "
                             "spill (darkroom, "
                             "but a hot queue deeper than --spill jobs per holder overflows to the model's cold "
                             "queue), assist=R or assist=R/D (darkroom with DARKROOM_ASSIST_WORK_PER_LOAD=R and "
                             "DARKROOM_ASSIST_QUEUE_DEPTH=D), slots=N (darkroom with DARKROOM_TASK_SLOTS=N)")
    parser.add_argument("--spill", type=int, default=16, help="hot-queue depth per holder before spilling")
    parser.add_argument("--scale", action="store_true", help="scale the fleet by the KEDA formula")
    parser.add_argument("--min-workers", type=int, default=2, help="with --scale: the fewest workers per pool")
    parser.add_argument("--keda-time", type=float, default=0.0,
                        help="KEDA seconds per wall second (default: 1 / time scale)")
    parser.add_argument("--lease", type=float, default=60, help="workers' job lease seconds (wall; default 60)")
    parser.add_argument("--heartbeat", type=float, default=10,
                        help="workers' heartbeat seconds (wall; a report lives 3 heartbeats; default 10)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a policy may take before it is cut short")
    parser.add_argument("--seed", type=int, default=22, help="seed of the workload (same jobs for every policy)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    for policy in (p.strip() for p in args.policies.split(",") if p.strip()):
        if policy not in ("darkroom", "baseline", "static", "spill", "nohold", "inline", "loadfirst") \
                and not _assist_policy(policy) \
                and not _slots_policy(policy):
            parser.error(f"--policies: unknown policy {policy!r}; use darkroom, baseline, static, nohold, inline, loadfirst, spill, "
                         "assist=R or assist=R/D with R > 0 and D >= 1 (e.g. assist=0.25/1), slots=N with N >= 1")
    args.flood = args.flood or 2 * args.workers
    args.keda_time = args.keda_time or 1 / args.time_scale
    if args.workers < 1 or args.jobs < 1 or not 0 < args.load <= 2:
        parser.error("--workers >= 1, --jobs >= 1, 0 < --load <= 2")
    workload = build_workload(args)
    from darkroom.dev.embedded import EmbeddedServices

    with tempfile.TemporaryDirectory(prefix="darkroom-fleet-") as tmp:
        folder = Path(tmp)
        services = EmbeddedServices(folder / "services")
        endpoints = services.up(timeout=60)
        try:
            from darkroom.common.settings import Settings

            # run-time limits count wall seconds: slowed down by the time scale like everything simulated
            env = {**endpoints.as_env(), "DARKROOM_STATE_DIR": str(folder / "state"), "DARKROOM_METRICS_PORT": "0",
                   "DARKROOM_JOB_TIME_BASE_SECONDS": str(120 * max(1.0, args.time_scale)),
                   "DARKROOM_ENGINE_STALL_SECONDS": str(600 * max(1.0, args.time_scale)),
                   # 50 processes on a small shared box: a lease renewal or heartbeat thread can starve for over
                   # 10 s, which requeues live jobs and hides holders; no worker dies here, so longer is harmless
                   "DARKROOM_LEASE_SECONDS": str(args.lease), "DARKROOM_HEARTBEAT_SECONDS": str(args.heartbeat)}
            settings = Settings(state_dir=folder / "state", redis_url=env["DARKROOM_REDIS_URL"],
                                s3_endpoint_url=env["DARKROOM_S3_ENDPOINT_URL"],
                                s3_access_key_id=env["DARKROOM_S3_ACCESS_KEY_ID"],
                                s3_secret_access_key=env["DARKROOM_S3_SECRET_ACCESS_KEY"],
                                s3_region=env["DARKROOM_S3_REGION"])
            results = []
            for policy in (p.strip() for p in args.policies.split(",") if p.strip()):
                results.append(run_policy(policy, args, workload, env, settings, folder))
                print(json.dumps(results[-1], default=str), file=sys.stderr)  # each policy's figures as they come
        finally:
            services.down()
    text = report(results, args, workload)
    print(text)
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=2, default=str))
    return 0 if all(r["unfinished"] == 0 and r["failed"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

