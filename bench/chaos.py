"""Chaos run with a nemesis: exactly one consistent result per job while workers and services misbehave.

    .venv/bin/python bench/chaos.py [--jobs 300] [--workers 3] [--repeat 2] [--faults kill,pause,...] [--json]

Starts its own Redis (AOF, ``appendfsync everysec``) and S3 server in a temporary folder, a tiny model
and worker processes, submits the jobs, and applies each fault ``--repeat`` times, scheduled by progress
(the fraction of jobs ended), not by the clock:

    kill        SIGKILL a worker that is running a job (it is restarted)
    pause       SIGSTOP a worker mid-job for 2x the lease, then SIGCONT: it wakes up a zombie
    redis-pause SIGSTOP Redis for 2x the lease (every lease expires under the workers), then SIGCONT
    redis-kill  SIGKILL Redis (not a graceful stop) and start it again from its AOF
    s3-outage   stop the S3 server for --s3-outage seconds
    drop        delete queued messages from the broker's lists (lost messages: the reconciler must act)
    duplicate   push a second copy of some jobs' messages (duplicate deliveries)
    resubmit    expire some finished jobs' records and submit their ids again with another seed

With ``--ha`` the Redis is the ``--ha`` embedded topology (a primary, one replica, three Sentinels with
``down-after-milliseconds`` 1000) and every client follows it through the Sentinels; the default fault is then

    primary-kill  SIGKILL whichever data node is primary; the Sentinels promote the replica; the dead node
                  is started again and rejoins as a replica

and a submitter keeps submitting one job at a time during the run: each submission the SDK acknowledged is
checked like the others, each refused one must have raised the retryable RedisUnavailable (never hung). It
also prints each failover's time (SIGKILL until the Sentinels name the new primary).

A fault counts only once it was actually applied (a kill needs a worker with a job, a drop needs a queued
message); a planned fault that never happened makes the run exit non-zero. After every job has ended and
one reconcile interval has passed, every job is checked: it ended (else *stuck*); its record exists (else
*lost*); a succeeded job's ``result.json`` (found from the job id alone) belongs to the job's current
submission and names images whose bytes have the SHA-256 it records (else *mismatched*); and its
history shows one outcome per submission (else *duplicate*). It prints those counts, the faults applied
and the longest recovery (a fault until its victims' jobs were started again).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (quiets libraries before they load)
from _common import table

FAULTS = ("kill", "pause", "redis-pause", "redis-kill", "s3-outage", "drop", "duplicate", "resubmit", "primary-kill")
HA_ONLY = {"primary-kill"}
LEASE = 3.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=2, help="times each fault is applied")
    parser.add_argument("--faults", default=None, help=f"comma-separated subset of {', '.join(FAULTS)} (default: "
                                                       "all but primary-kill; with --ha: primary-kill)")
    parser.add_argument("--s3-outage", type=float, default=6.0, help="seconds the S3 server is down")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per job (strength 1)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="give up waiting after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the report as JSON (for tests)")
    parser.add_argument("--keep", type=Path, default=None, help="keep services' data and worker logs here")
    parser.add_argument("--ha", action="store_true", help="Redis with a replica and three Sentinels; default "
                                                          "fault primary-kill; submissions go on during the run")
    args = parser.parse_args()
    faults = args.faults or ("primary-kill" if args.ha else ",".join(f for f in FAULTS if f not in HA_ONLY))
    kinds = [k.strip() for k in faults.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(FAULTS))
    if unknown:
        parser.error(f"unknown faults {unknown}; choose from {', '.join(FAULTS)}")
    if set(kinds) & HA_ONLY and not args.ha:
        parser.error("primary-kill needs --ha")
    if args.ha and set(kinds) & {"redis-pause", "redis-kill"}:
        parser.error("with --ha, kill the primary with primary-kill (redis-pause/redis-kill act on the first node)")
    report = run(args, kinds)
    if args.json:
        print(json.dumps(report))
    else:
        print(table([(k, json.dumps(v) if isinstance(v, dict) else str(v)) for k, v in report.items()]))
    bad = report["lost"] + report["duplicate"] + report["mismatched"] + report["stuck"] + report.get("hung", 0)
    sys.exit(0 if bad == 0 and not report["faults_missed"] else 1)


@dataclass
class Nemesis:
    """Applies faults when the run reaches the progress planned for each; records what really happened."""

    rng: random.Random
    fleet: Any
    services: Any
    client: Any
    args: argparse.Namespace
    jobs: list[str]
    done: set[str]
    plan: list[tuple[float, str]]
    applied: Counter[str] = field(default_factory=Counter)
    recoveries: list[tuple[float, list[str]]] = field(default_factory=list)  # (fault time, victim job ids)
    resubmitted: dict[str, int] = field(default_factory=dict)  # job id -> seed of its new submission
    failovers: list[float] = field(default_factory=list)  # seconds from SIGKILL to a new primary (--ha)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        for fraction, kind in self.plan:
            while len(self.done) < fraction * len(self.jobs):
                if self.stop.wait(0.2):
                    return
            tried = time.monotonic()
            for _ in range(240):  # a fault that finds nothing to act on now tries again shortly
                try:
                    if getattr(self, "_" + kind.replace("-", "_"))():
                        self.applied[kind] += 1
                        print(f"chaos: applied {kind} at {len(self.done)}/{len(self.jobs)} done", file=sys.stderr)
                        break
                except Exception as exc:  # noqa: BLE001 - chaos goes on; the check at the end decides
                    print(f"chaos: {kind} failed: {exc}", file=sys.stderr)
                if self.stop.wait(0.25):
                    return
            else:
                print(f"chaos: {kind} found nothing to act on for {time.monotonic() - tried:.0f} s", file=sys.stderr)

    # -- faults (each returns whether it was applied) --------------------------------------------
    def _busy_worker(self) -> tuple[int, list[str]] | None:
        from darkroom.common.fleet import Fleet

        busy = {w.name: [j["job_id"] for j in w.data.get("current_jobs", [])]
                for w in Fleet(self.client.jobs.redis, ttl=0).workers()}
        candidates = [i for i, w in enumerate(self.fleet.workers) if busy.get(w.name) and w.alive()]
        if not candidates:
            return None
        index = self.rng.choice(candidates)
        return index, busy[self.fleet.workers[index].name]

    def _kill(self) -> bool:
        found = self._busy_worker()
        if found is None:
            return False
        index, victims = found
        self.recoveries.append((time.time(), victims))
        self.fleet.kill(index)
        return True

    def _pause(self) -> bool:
        found = self._busy_worker()
        if found is None:
            return False
        index, victims = found
        worker = self.fleet.workers[index]
        self.recoveries.append((time.time(), victims))
        os.kill(worker.pid, signal.SIGSTOP)
        time.sleep(2 * LEASE)
        os.kill(worker.pid, signal.SIGCONT)
        return True

    def _redis_pause(self) -> bool:
        pid = int(self.services.status()["redis"]["pid"])
        os.kill(pid, signal.SIGSTOP)
        time.sleep(2 * LEASE)
        os.kill(pid, signal.SIGCONT)
        return True

    def _redis_kill(self) -> bool:
        pid = int(self.services.status()["redis"]["pid"])
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid)
        time.sleep(0.5)
        self.services.up(timeout=60)
        return True

    def _primary_kill(self) -> bool:
        """SIGKILL the primary, time the Sentinels' promotion, then start the dead node again (a replica now)."""
        primary = self.services.primary()
        if primary is None:
            return False
        port = int(primary.rsplit(":", 1)[1])
        pid = next(int(info["pid"]) for info in self.services.status().values() if info["port"] == port)
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        while self.services.primary() in (primary, None):
            if time.monotonic() - killed > 120:
                raise RuntimeError(f"no failover from {primary} in 120 s")
            time.sleep(0.05)
        self.failovers.append(round(time.monotonic() - killed, 2))
        _wait_gone(pid)
        self.services.up(timeout=120)
        return True

    def _s3_outage(self) -> bool:
        pid = int(self.services.status()["s3"]["pid"])
        os.kill(pid, signal.SIGTERM)
        _wait_gone(pid)
        time.sleep(self.args.s3_outage)
        self.services.up(timeout=60)
        return True

    def _drop(self) -> bool:
        from darkroom.common.broker import message_task_id

        r = self.client.jobs.redis
        dropped = []
        for key in r.scan_iter(match="darkroom.img2img*"):
            if r.type(key) not in (b"list", "list"):
                continue
            for _ in range(3):
                raw = r.rpop(key)  # the next messages out
                if raw is None:
                    break
                dropped.append(message_task_id(json.loads(raw)) or "?")
        if dropped:
            self.recoveries.append((time.time(), dropped))
        return bool(dropped)

    def _duplicate(self) -> bool:
        from darkroom.common.broker import origin, task_message
        from darkroom.common.jobs import MESSAGE_SCHEMA_VERSION
        from darkroom.common.queues import TASK_IMG2IMG

        r = self.client.jobs.redis
        open_jobs = [j for j in self.jobs if j not in self.done][:200]
        records = [rec for rec in self.client.jobs.get_many(open_jobs) if rec is not None and rec.job is not None]
        if not records:
            return False
        for record in self.rng.sample(records, min(3, len(records))):
            payload = {**record.job.model_dump(mode="json"), "schema_version": MESSAGE_SCHEMA_VERSION}
            queue, message = task_message(TASK_IMG2IMG, record.job_id, [payload],
                                          queue=self.client.fleet.queue_for(record.job.model),
                                          priority=record.job.priority.broker_priority, sender=origin())
            r.lpush(queue, message)
        return True

    def _resubmit(self) -> bool:
        from darkroom.common.jobstore import job_key

        finished = [j for j in self.jobs if j in self.done and j not in self.resubmitted]
        if not finished:
            return False
        chosen = self.rng.sample(finished, min(3, len(finished)))
        for job_id in chosen:
            record = self.client.jobs.get(job_id)
            if record is None or record.job is None:
                continue
            seed = 10_000 + len(self.resubmitted)
            self.client.jobs.redis.delete(job_key(job_id))  # as if its record expired
            self.done.discard(job_id)
            self.resubmitted[job_id] = seed
            self.client.submit({**record.job.model_dump(mode="json"), "seed": seed})
        return True


def run(args: argparse.Namespace, kinds: list[str]) -> dict[str, Any]:
    from darkroom.common.settings import Settings
    from darkroom.dev.demo import sample_image
    from darkroom.dev.embedded import EmbeddedServices
    from darkroom.dev.tiny import make_tiny_model
    from darkroom.producer.client import Client

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        state = args.keep or Path(tmp)
        if args.ha:
            from darkroom.dev.embedded_ha import HAServices

            services: Any = HAServices(state / "services", appendonly=True, down_after_ms=1000,
                                       failover_timeout_ms=3000)
        else:
            services = EmbeddedServices(state / "services", appendonly=True)
        endpoints = services.up(timeout=120)
        try:
            model = make_tiny_model(state / "tiny")
            env = {**endpoints.as_env(), "DARKROOM_STATE_DIR": str(state), "DARKROOM_LEASE_SECONDS": str(LEASE),
                   "DARKROOM_HEARTBEAT_SECONDS": "1", "DARKROOM_PROGRESS_INTERVAL_SECONDS": "0.5",
                   "DARKROOM_CPU_THREADS": "1", "DARKROOM_RECONCILE_GRACE_SECONDS": "5",
                   "DARKROOM_RECONCILE_INTERVAL_SECONDS": "2", "DARKROOM_REDIS_SOCKET_TIMEOUT_SECONDS": "5",
                   "DARKROOM_RETRY_BACKOFF_CAP_SECONDS": "8", "DARKROOM_TRANSIENT_RETRIES": "30"}
            fleet = _Fleet(args.workers, model, env, state)
            settings = Settings(state_dir=state, **{k[len("DARKROOM_"):].lower(): v for k, v in
                                                     endpoints.as_env().items()})
            with Client(settings) as client:
                uri = client.upload(sample_image(64), f"s3://darkroom/inputs/{uuid.uuid4().hex}.png")
                fleet.start_all()
                handles = client.submit_many([
                    {"model": "tiny", "image": uri, "prompt": f"chaos {i}", "strength": 1.0,
                     "num_inference_steps": args.steps, "seed": i, "output_prefix": "s3://darkroom/chaos"}
                    for i in range(args.jobs)
                ])
                jobs = [h.job_id for h in handles]
                done: set[str] = set()
                plan = _plan(rng, kinds, args.repeat)
                nemesis = Nemesis(rng, fleet, services, client, args, jobs, done, plan)
                started = time.monotonic()
                chaos = threading.Thread(target=nemesis.run, daemon=True)
                submitter = _Submitter(settings, uri, args.steps, chaos)
                chaos.start()
                if args.ha:
                    submitter.start()
                _wait_all(client, jobs, done, args.timeout, lambda: not chaos.is_alive())
                nemesis.stop.set()
                chaos.join(timeout=60)
                if args.ha:
                    submitter.join()
                    jobs += submitter.acknowledged
                    _wait_all(client, jobs, done, args.timeout, lambda: True)
                time.sleep(float(env["DARKROOM_RECONCILE_INTERVAL_SECONDS"]) + 1)  # one more reconcile interval
                elapsed = time.monotonic() - started
                report = _check(client, jobs, nemesis.resubmitted)
                planned = Counter(kind for _, kind in plan)
                report.update(
                    seconds=round(elapsed, 1), faults_applied=dict(nemesis.applied),
                    faults_missed={k: n - nemesis.applied[k] for k, n in planned.items() if nemesis.applied[k] < n},
                    max_recovery_s=_max_recovery(client, nemesis.recoveries),
                )
                if args.ha:
                    report.update(failover_s=nemesis.failovers, submitted_during=len(submitter.acknowledged),
                                  refused_during=submitter.refused, refused_kinds=dict(submitter.kinds),
                                  longest_submit_s=round(submitter.longest, 2), hung=submitter.hung)
            fleet.stop_all()
        finally:
            services.down()
    return report


NEEDS_WORK = ("kill", "pause", "drop", "duplicate", "primary-kill")
"""Faults that need jobs in flight or queued: planned in the first half of the run."""


def _plan(rng: random.Random, kinds: list[str], repeat: int) -> list[tuple[float, str]]:
    """Each fault ``repeat`` times in a shuffled order, at spread fractions of the jobs ended: the ones that
    need work in flight within the first half, the others over the whole run."""
    early = [k for k in kinds for _ in range(repeat) if k in NEEDS_WORK]
    late = [k for k in kinds for _ in range(repeat) if k not in NEEDS_WORK]
    rng.shuffle(early)
    rng.shuffle(late)
    plan = [(0.02 + 0.45 * i / max(1, len(early)), k) for i, k in enumerate(early)]
    plan += [(0.05 + 0.8 * i / max(1, len(late)), k) for i, k in enumerate(late)]
    return sorted(plan)


def _wait_gone(pid: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


class _Submitter(threading.Thread):
    """Submits one job at a time while the nemesis runs (--ha): what the SDK acknowledged must all end; a
    refusal must be the retryable RedisUnavailable; a call that takes longer than HUNG_S counts as hung."""

    HUNG_S = 60.0

    def __init__(self, settings: Any, uri: str, steps: int, chaos: threading.Thread) -> None:
        super().__init__(daemon=True)
        self.settings, self.uri, self.steps, self.chaos = settings, uri, steps, chaos
        self.acknowledged: list[str] = []
        self.refused = 0
        self.hung = 0
        self.longest = 0.0
        self.kinds: Counter[str] = Counter()

    def run(self) -> None:
        from darkroom.common.errors import RedisUnavailable
        from darkroom.producer.client import Client

        with Client(self.settings) as client:
            while self.chaos.is_alive():
                started = time.monotonic()
                try:
                    handle = client.submit({"model": "tiny", "image": self.uri, "prompt": "during chaos",
                                            "strength": 1.0, "num_inference_steps": self.steps,
                                            "seed": len(self.acknowledged), "output_prefix": "s3://darkroom/chaos"})
                    self.acknowledged.append(handle.job_id)
                except RedisUnavailable as exc:
                    self.refused += 1
                    self.kinds[type(exc).__name__] += 1
                took = time.monotonic() - started
                self.longest = max(self.longest, took)
                self.hung += took > self.HUNG_S
                time.sleep(0.2)


class _Fleet:
    """Worker processes that can be killed and replaced."""

    def __init__(self, size: int, model: Path, env: dict[str, str], state: Path) -> None:
        from darkroom.dev.process import WorkerProcess

        self._make = lambda n: WorkerProcess(f"chaos-{n}", ["--model", f"tiny={model}"], env=env,
                                             redis_url=env["DARKROOM_REDIS_URL"],
                                             log_path=state / "logs" / f"chaos-{n}.log")
        self.size = size
        self.workers: list[Any] = []
        self.count = 0
        self._restarts: list[threading.Thread] = []

    def start_all(self) -> None:
        self.workers = [self._new() for _ in range(self.size)]

    def _new(self) -> Any:
        self.count += 1
        return self._make(self.count).start(timeout=180)

    def kill(self, index: int) -> None:
        """SIGKILL one worker; its replacement starts in the background (the nemesis goes on meanwhile)."""
        victim = self.workers[index]
        os.kill(victim.pid, signal.SIGKILL)
        victim.proc.wait()
        restart = threading.Thread(target=self._replace, args=(index,), daemon=True)
        restart.start()
        self._restarts.append(restart)

    def _replace(self, index: int) -> None:
        self.workers[index] = self._new()

    def stop_all(self) -> None:
        for restart in self._restarts:
            restart.join(timeout=200)
        for worker in self.workers:
            worker.stop(timeout=20)


def _wait_all(client: Any, job_ids: list[str], done: set[str], timeout: float, chaos_over: Any) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pending = [j for j in job_ids if j not in done]
            for job_id, record in zip(pending, client.jobs.get_many(pending), strict=True):
                if record is not None and record.status.is_terminal:
                    done.add(job_id)
        except Exception:  # noqa: BLE001 - Redis may be down right now
            pass
        if len(done) == len(job_ids) and chaos_over():
            return
        time.sleep(0.5)


def _check(client: Any, job_ids: list[str], resubmitted: dict[str, int]) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    lost = stuck = mismatched = duplicate = 0
    for job_id in job_ids:
        record = client.jobs.get(job_id)
        if record is None:
            lost += 1
            continue
        if not record.status.is_terminal:
            stuck += 1
            continue
        statuses[record.status.value] += 1
        outcomes = [e for e in client.jobs.history(job_id) if e.get("event") in {"finished", "worker_fatal"}
                    and e.get("status") in {"succeeded", "failed", "cancelled"}
                    and e.get("submission") == record.submission]
        if len(outcomes) > 1:
            duplicate += 1
        if record.status.value == "succeeded" and not _consistent(client, record, resubmitted.get(job_id)):
            mismatched += 1
    return {"jobs": len(job_ids), "succeeded": statuses["succeeded"], "failed": statuses["failed"],
            "cancelled": statuses["cancelled"], "resubmitted": len(resubmitted), "lost": lost,
            "duplicate": duplicate, "mismatched": mismatched, "stuck": stuck}


def _consistent(client: Any, record: Any, seed: int | None) -> bool:
    """result.json is the current submission's, and every image it names has the bytes it records."""
    result = record.result
    if result is None:
        return False
    try:
        published = json.loads(client.download(result.result_uri))
        if published.get("submission") != record.submission or published.get("attempt") != result.attempt:
            return False
        if seed is not None and published["outputs"][0]["seed"] != seed:
            return False
        for output in published["outputs"]:
            if output.get("uri") and hashlib.sha256(client.download(output["uri"])).hexdigest() != output["sha256"]:
                return False
    except Exception as exc:  # noqa: BLE001 - a missing object is a mismatch
        print(f"check {record.job_id}: {exc}", file=sys.stderr)
        return False
    return True


def _max_recovery(client: Any, recoveries: list[tuple[float, list[str]]]) -> float | None:
    """For each fault with victims: seconds until each victim job was started (or enqueued) again."""
    from datetime import datetime

    worst: float | None = None
    for at, victims in recoveries:
        for job_id in victims:
            later = [datetime.fromisoformat(e["time"]).timestamp() for e in client.jobs.history(job_id)
                     if e.get("event") in {"started", "reconciled"}]
            after = [t for t in later if t > at]
            if after:
                took = min(after) - at
                worst = took if worst is None else max(worst, took)
    return None if worst is None else round(worst, 1)


if __name__ == "__main__":
    main()
