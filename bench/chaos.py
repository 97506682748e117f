"""Chaos run (issue 6): exactly one result per job while workers die and services fail.

    .venv/bin/python bench/chaos.py [--jobs 300] [--workers 3] [--kills 6] [--s3-outage 10] [--json]

Starts its own Redis (AOF on) and S3 server in a temporary folder, a tiny model and worker processes,
submits the jobs, then: SIGKILLs random workers at random times (restarting each), restarts Redis
once, and stops the S3 server for --s3-outage seconds. At the end it checks every job: terminal,
and for each succeeded job exactly one set of outputs (its images, their thumbnails and one
result.json, nothing else). Prints jobs, succeeded, failed, lost, duplicate outputs and the longest recovery after a kill
(kill -> the killed worker's job started again elsewhere).
"""

from __future__ import annotations

import argparse
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
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (quiets libraries before they load)
from _common import table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--kills", type=int, default=6, help="worker SIGKILLs, spread over the run")
    parser.add_argument("--s3-outage", type=float, default=10.0, help="seconds the S3 server is down")
    parser.add_argument("--steps", type=int, default=6, help="denoising steps per job (strength 1)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="give up waiting after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the counts as JSON (for tests)")
    parser.add_argument("--keep", type=Path, default=None, help="keep services' data and worker logs here")
    args = parser.parse_args()
    report = run(args)
    if args.json:
        print(json.dumps(report))
    else:
        print(table([(k, str(v)) for k, v in report.items()]))
    sys.exit(0 if report["lost"] == 0 and report["duplicate_outputs"] == 0 else 1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from darkroom.common.settings import Settings
    from darkroom.producer.client import Client
    from darkroom.producer.embedded import EmbeddedServices
    from darkroom.worker.demo import sample_image
    from darkroom.worker.tiny import make_tiny_model

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        state = args.keep or Path(tmp)
        services = EmbeddedServices(state / "services", appendonly=True)
        endpoints = services.up()
        try:
            model = make_tiny_model(state / "tiny")
            env = {**endpoints.as_env(), "DARKROOM_STATE_DIR": str(state), "DARKROOM_LEASE_SECONDS": "3",
                   "DARKROOM_HEARTBEAT_SECONDS": "1", "DARKROOM_PROGRESS_INTERVAL_SECONDS": "5",
                   "DARKROOM_CPU_THREADS": "1"}
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
                started = time.monotonic()
                chaos = threading.Thread(target=_chaos, args=(rng, fleet, services, client, args), daemon=True)
                chaos.start()
                _wait_all(client, [h.job_id for h in handles], args.timeout)
                chaos.join(timeout=args.s3_outage + 60)
                elapsed = time.monotonic() - started
                report = _check(client, [h.job_id for h in handles])
                report.update(seconds=round(elapsed, 1), kills=len(fleet.kills),
                              max_recovery_after_kill_s=_max_recovery(client, fleet.kills))
            fleet.stop_all()
        finally:
            services.down()
    return report


class _Fleet:
    """Worker processes that can be killed and replaced."""

    def __init__(self, size: int, model: Path, env: dict[str, str], state: Path) -> None:
        from darkroom.worker.process import WorkerProcess

        self._make = lambda n: WorkerProcess(f"chaos-{n}", ["--model", f"tiny={model}"], env=env,
                                             redis_url=env["DARKROOM_REDIS_URL"],
                                             log_path=state / "logs" / f"chaos-{n}.log")
        self.size = size
        self.workers: list[Any] = []
        self.count = 0
        self.kills: list[tuple[float, str]] = []

    def start_all(self) -> None:
        self.workers = [self._new() for _ in range(self.size)]

    def _new(self) -> Any:
        self.count += 1
        return self._make(self.count).start(timeout=180)

    def kill_one(self, rng: random.Random) -> None:
        index = rng.randrange(len(self.workers))
        victim = self.workers[index]
        self.kills.append((time.time(), victim.name))
        os.kill(victim.pid, signal.SIGKILL)
        victim.proc.wait()
        self.workers[index] = self._new()

    def stop_all(self) -> None:
        for worker in self.workers:
            worker.stop(timeout=20)


def _chaos(rng: random.Random, fleet: _Fleet, services: Any, client: Any, args: argparse.Namespace) -> None:
    events = ["kill"] * args.kills + ["redis", "s3"]
    rng.shuffle(events)
    for event in events:
        time.sleep(rng.uniform(1.0, 4.0))
        if _all_done(client):
            return
        try:
            if event == "kill":
                fleet.kill_one(rng)
            elif event == "redis":
                _restart(services, "redis", 0.5)
            else:
                _restart(services, "s3", args.s3_outage)
        except Exception as exc:  # noqa: BLE001 - chaos must go on; the check at the end decides
            print(f"chaos step {event} failed: {exc}", file=sys.stderr)


def _restart(services: Any, name: str, down_for: float) -> None:
    pid = services.status()[name]["pid"]
    os.kill(int(pid), signal.SIGTERM)
    time.sleep(down_for)
    services.up(timeout=60)
    print(f"{name} was down {down_for:.1f} s and is back", file=sys.stderr)


_DONE: set[str] = set()
_ALL: list[str] = []


def _all_done(client: Any) -> bool:
    return bool(_ALL) and len(_DONE) == len(_ALL)


def _wait_all(client: Any, job_ids: list[str], timeout: float) -> None:
    _ALL[:] = job_ids
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pending = [j for j in job_ids if j not in _DONE]
            for job_id in pending:
                record = client.jobs.get(job_id)
                if record is not None and record.status.is_terminal:
                    _DONE.add(job_id)
        except Exception:  # noqa: BLE001 - Redis may be restarting right now
            pass
        if len(_DONE) == len(job_ids):
            return
        time.sleep(1.0)


def _check(client: Any, job_ids: list[str]) -> dict[str, Any]:
    from darkroom.common.storage import S3Uri

    statuses: Counter[str] = Counter()
    lost = duplicates = 0
    for job_id in job_ids:
        record = client.jobs.get(job_id)
        if record is None or not record.status.is_terminal:
            lost += 1
            continue
        statuses[record.status.value] += 1
        if record.status.value != "succeeded" or record.result is None:
            continue
        root = S3Uri.parse("s3://darkroom/chaos").join(job_id)
        listing = client.store.client.list_objects_v2(Bucket=root.bucket, Prefix=root.key + "/")
        names = sorted(o["Key"].rsplit("/", 1)[-1] for o in listing.get("Contents", []))
        published = [*record.result.uris, *(o.thumbnail_uri for o in record.result.outputs if o.thumbnail_uri)]
        expected = sorted([u.rsplit("/", 1)[-1] for u in published] + ["result.json"])
        if names != expected:
            duplicates += 1
    return {"jobs": len(job_ids), "succeeded": statuses["succeeded"], "failed": statuses["failed"],
            "cancelled": statuses["cancelled"], "lost": lost, "duplicate_outputs": duplicates}


def _max_recovery(client: Any, kills: list[tuple[float, str]]) -> float | None:
    """For each kill: seconds until a job the victim had started was started again by another worker."""
    from datetime import datetime

    worst: float | None = None
    for job_id in _ALL:
        history = client.jobs.history(job_id)
        for i, entry in enumerate(history):
            if entry.get("event") != "started":
                continue
            for killed_at, name in kills:
                if entry.get("worker") != name:
                    continue
                later = [e for e in history[i + 1:] if e.get("event") == "started"]
                if later and datetime.fromisoformat(later[0]["time"]).timestamp() > killed_at:
                    took = datetime.fromisoformat(later[0]["time"]).timestamp() - killed_at
                    worst = took if worst is None else max(worst, took)
    return None if worst is None else round(worst, 1)


if __name__ == "__main__":
    main()
