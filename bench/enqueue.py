"""Enqueue benchmark: jobs/s that ``Client.submit_many`` enqueues from one process.

    .venv/bin/python bench/enqueue.py [--jobs 20000] [--single 2000] [--celery 500] [--chunk 500]

Starts its own embedded Redis and S3 server in a temporary folder; needs no worker (the jobs stay
queued). Measured side by side in this one run, each from the same process and connection:

- ``submit_many``: validate all, then one Redis round trip per chunk (records, events, broker messages);
- a loop of ``submit``: the same work, one round trip per job;
- the old path, for reference: record the job, then Celery's ``send_task`` per job.

Every number covers validation, the ``queued`` status records and events and the broker messages;
the run checks that the broker lists hold one message per job. Target: submit_many >= 3,000 jobs/s.

``--ha`` measures the cost of durable submissions instead: it starts the ``--ha`` embedded topology (a
primary, one replica, three Sentinels) and runs ``submit_many`` and the loop of ``submit`` through the
Sentinel-managed client twice each, with ``WAIT 1`` after every round trip (the default under Sentinel)
and without it (``redis_wait_replicas=0``), side by side.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import embedded_services

from darkroom.common.queues import PRIORITY_STEPS, TASK_IMG2IMG, broker_list, celery_config, cold_queue
from darkroom.producer.client import Client

TARGET = 3000.0


def make_jobs(count: int, model: str) -> list[dict[str, Any]]:
    """Jobs as a producer would send them; every other one bulk (its message goes to another list)."""
    return [{"model": model, "image": f"s3://darkroom/inputs/{i % 97}.png", "prompt": f"a lighthouse, take {i}",
             "strength": 0.6, "priority": "bulk" if i % 2 else "interactive"} for i in range(count)]


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def queued_messages(client: Client, model: str) -> int:
    redis = client.jobs.redis
    return sum(int(redis.llen(broker_list(cold_queue(model), p))) for p in PRIORITY_STEPS)


def celery_loop(client: Client, jobs: list[dict[str, Any]]) -> None:
    """The naive submit path (what ``submit_many`` replaces): record the job, then Celery's send_task, one job at a time."""
    from celery import Celery

    app = Celery("darkroom-bench", set_as_current=False)
    app.conf.update(celery_config(client.settings))
    try:
        for raw in jobs:
            job = client.prepare(raw)
            client.jobs.create(job)
            app.send_task(TASK_IMG2IMG, args=[job.model_dump(mode="json")], task_id=job.job_id,
                          queue=client.fleet.queue_for(job.model), priority=job.priority.broker_priority)
    finally:
        app.close()


def measure(client: Client, label: str, count: int, run: Callable[[list[dict[str, Any]]], object]) -> tuple[str, float]:
    """Jobs/s of ``run`` over ``count`` fresh jobs of a model of their own; checks every message is queued."""
    model = f"bench-{label}"
    jobs = make_jobs(count, model)
    run(make_jobs(min(count, 200), model))  # warm-up: connections, caches, code paths
    client.jobs.redis.flushdb()
    seconds = timed(lambda: run(jobs))
    assert queued_messages(client, model) == count, f"{label}: broker lists do not hold {count} messages"
    client.jobs.redis.flushdb()
    return f"{count} jobs in {seconds:.2f} s", count / seconds


def run_ha(args: argparse.Namespace) -> None:
    """submit_many and submit through Sentinel, with and without WAIT for one replica, in one topology."""
    from darkroom.common.settings import Settings
    from darkroom.dev.embedded_ha import HAServices

    with tempfile.TemporaryDirectory() as tmp:
        services = HAServices(Path(tmp) / "services")
        endpoints = services.up(timeout=120)
        try:
            base = {k.removeprefix("DARKROOM_").lower(): v for k, v in endpoints.as_env().items()}
            rates: dict[str, tuple[str, float]] = {}
            for label, replicas in (("wait", 1), ("nowait", 0)):
                settings = Settings.model_validate({**base, "state_dir": Path(tmp) / "state",
                                                    "redis_wait_replicas": replicas})
                with Client(settings) as client:
                    rates[f"many-{label}"] = measure(client, f"many-{label}", args.jobs,
                                                     lambda jobs, c=client: c.submit_many(jobs, chunk=args.chunk))
                    rates[f"single-{label}"] = measure(client, f"single-{label}", args.single,
                                                       lambda jobs, c=client: [c.submit(j) for j in jobs])
        finally:
            services.down()
    rows = []
    for kind, name in (("many", f"submit_many (chunks of {args.chunk})"), ("single", "loop of submit")):
        wait, nowait = rates[f"{kind}-wait"], rates[f"{kind}-nowait"]
        rows.append((name, f"{nowait[1]:8,.0f} jobs/s without WAIT   {wait[1]:8,.0f} jobs/s with WAIT 1   "
                           f"({wait[1] / nowait[1]:.2f}x; {wait[0]} with WAIT)"))
    width = max(len(name) for name, _ in rows)
    print("Sentinel-managed client, primary + 1 replica on this host")
    print("\n".join(f"{name.ljust(width)}  {value}" for name, value in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs for submit_many")
    parser.add_argument("--single", type=int, default=2_000, help="jobs for the loop of submit")
    parser.add_argument("--celery", type=int, default=500, help="jobs for the send_task loop (0: skip it)")
    parser.add_argument("--chunk", type=int, default=500, help="jobs per round trip in submit_many")
    parser.add_argument("--ha", action="store_true",
                        help="through Sentinel, with and without WAIT 1 (the cost of durable submissions)")
    args = parser.parse_args()
    if args.ha:
        run_ha(args)
        return

    with tempfile.TemporaryDirectory() as tmp, embedded_services(Path(tmp)) as (_, settings), \
            Client(settings) as client:
        many = measure(client, "many", args.jobs, lambda jobs: client.submit_many(jobs, chunk=args.chunk))
        single = measure(client, "single", args.single, lambda jobs: [client.submit(j) for j in jobs])
        celery = measure(client, "celery", args.celery, lambda jobs: celery_loop(client, jobs)) \
            if args.celery else None

    rows = [
        ("submit_many", f"{many[1]:8,.0f} jobs/s   ({many[0]}, chunks of {args.chunk})"),
        ("loop of submit", f"{single[1]:8,.0f} jobs/s   ({single[0]})"),
    ]
    if celery is not None:
        rows.append(("record + send_task loop", f"{celery[1]:8,.0f} jobs/s   ({celery[0]}; the naive path)"))
    rows.append(("submit_many / submit", f"{many[1] / single[1]:.1f}x"))
    if celery is not None:
        rows.append(("submit_many / send_task", f"{many[1] / celery[1]:.1f}x"))
    rows.append(("target", f">= {TARGET:,.0f} jobs/s from one process: {'met' if many[1] >= TARGET else 'NOT met'}"))
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name.ljust(width)}  {value}" for name, value in rows))


if __name__ == "__main__":
    main()
