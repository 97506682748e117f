"""Fair share benchmark (issue 18): two producers flood one model with bulk jobs at 3:1 volume.

    .venv/bin/python bench/fairness.py [--jobs-a 45] [--jobs-b 15] [--batch 4] [--weights 1:1] [--no-baseline]

Starts its own Redis and S3 server in a temporary folder, registers two producers (team-a, team-b; signed
submissions) and one real worker serving the tiny model. team-a submits its bulk jobs, then team-b its
(a third as many) right after, then, once a few jobs have completed, one interactive job arrives. Run
twice: FIFO (DARKROOM_FAIR_SHARE off: one bulk list per model) and fair share (each producer's bulk
work held in its own queue and released by weight).

Prints, per run, each producer's share of the jobs completed while both still had work waiting
(from the first start to the moment the first of them had started its last job; target with equal
weights: 50% +- 10%) and the interactive job's wait (submit to the start of its pipeline call:
queue wait + batch wait; target: within one batch time, the median pipeline call of the bulk jobs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import _common  # quiets libraries before they load; shared helpers
from _common import table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs-a", type=int, default=45, help="team-a's bulk jobs")
    parser.add_argument("--jobs-b", type=int, default=15, help="team-b's bulk jobs")
    parser.add_argument("--batch", type=int, default=4, help="DARKROOM_BATCH_MAX_IMAGES of the worker")
    parser.add_argument("--steps", type=int, default=8, help="num_inference_steps (strength 0.5)")
    parser.add_argument("--weights", default="1:1", help="team-a:team-b fair-share weights")
    parser.add_argument("--no-baseline", action="store_true", help="skip the FIFO run")
    parser.add_argument("--json", action="store_true", help="also print the measurements as JSON")
    args = parser.parse_args()
    weights = tuple(float(w) for w in args.weights.split(":"))
    with tempfile.TemporaryDirectory(prefix="darkroom-fairness-") as folder, \
            _common.embedded_services(Path(folder)) as (endpoints, settings):
        measured = {}
        for fair in ([False] if not args.no_baseline else []) + [True]:
            measured["fair share" if fair else "FIFO"] = run(args, endpoints, settings, Path(folder), fair, weights)
    for name, result in measured.items():
        print(f"\n{name}:")
        print(table(rows(result)))
    if args.json:
        print(json.dumps(measured, indent=2))


def run(args: argparse.Namespace, endpoints: Any, settings: Any, folder: Path, fair: bool,
        weights: tuple[float, float]) -> dict[str, Any]:
    from pydantic import SecretStr

    from darkroom.common.clients import make_redis
    from darkroom.common.producers import ProducerRegistry
    from darkroom.dev.demo import sample_image
    from darkroom.dev.process import WorkerProcess
    from darkroom.dev.tiny import make_tiny_model
    from darkroom.producer.client import Client

    rdb = make_redis(settings)
    rdb.flushdb()
    registry = ProducerRegistry(rdb)
    clients = {}
    for producer, weight in zip(("team-a", "team-b"), weights, strict=True):
        entry, secret = registry.add(producer, weight=weight)
        clients[producer] = Client(settings.model_copy(update={
            "producer_id": producer, "producer_key_id": entry.keys[0].key_id, "producer_key": SecretStr(secret),
            "fair_share": fair}))
    model = folder / "tiny"
    if not model.exists():
        make_tiny_model(model)
    env = {**endpoints.as_env(), "DARKROOM_STATE_DIR": str(folder / "worker"), "DARKROOM_METRICS_PORT": "0",
           "DARKROOM_BATCH_MAX_IMAGES": str(args.batch), "DARKROOM_SAFETY_CHECKER": "none"}
    name = f"fair-{uuid.uuid4().hex[:6]}"
    print(f"{'fair share' if fair else 'FIFO'}: starting a worker ...", file=sys.stderr)
    worker = WorkerProcess(name, ["--model", f"tiny={model}", "--loglevel", "WARNING"], env=env,
                           redis_url=env["DARKROOM_REDIS_URL"], log_path=folder / f"{name}.log").start(timeout=600)
    a, b = clients["team-a"], clients["team-b"]
    image = a.upload(_png(sample_image(64)), f"s3://darkroom/fairness/{uuid.uuid4().hex}.png")
    job = {"model": "tiny", "image": image, "prompt": "a lighthouse", "strength": 0.5, "num_inference_steps": args.steps}
    try:
        a.submit({**job, "seed": 0}).wait(timeout=600)  # warm-up: the model is loaded before timing
        started = time.perf_counter()
        bulk = {"team-a": a.submit_many([{**job, "priority": "bulk", "seed": i} for i in range(args.jobs_a)]),
                "team-b": b.submit_many([{**job, "priority": "bulk", "seed": i} for i in range(args.jobs_b)])}
        _wait_for_completions(a, [h.job_id for h in bulk["team-a"] + bulk["team-b"]], 2 * args.batch)
        urgent = b.submit({**job, "seed": 999})
        urgent_result = urgent.wait(timeout=600)
        done = {p: [h.wait(timeout=3600) for h in handles] for p, handles in bulk.items()}
        seconds = time.perf_counter() - started
        records = {p: [a.jobs.require(r.job_id) for r in results] for p, results in done.items()}
    finally:
        worker.stop()
        for client in clients.values():
            client.close()
        rdb.close()
    return measure(records, done, urgent_result, seconds)


def measure(records: dict[str, list[Any]], done: dict[str, list[Any]], urgent: Any, seconds: float) -> dict[str, Any]:
    def start(record: Any) -> float:
        return float(record.created_at.timestamp() + (record.result.timings.queue_wait or 0.0))

    last_start = {p: max(start(r) for r in recs) for p, recs in records.items()}
    window_end = min(last_start.values())  # the first producer to run out of waiting work had just started its last
    window_start = min(start(r) for recs in records.values() for r in recs)
    finished = {p: [r.updated_at.timestamp() for r in recs] for p, recs in records.items()}
    in_window = {p: sum(1 for t in times if window_start <= t <= window_end) for p, times in finished.items()}
    total = sum(in_window.values()) or 1
    calls = [r.timings.inference for results in done.values() for r in results]
    wait = (urgent.timings.queue_wait or 0.0) + urgent.timings.batch_wait
    return {"share": {p: n / total for p, n in in_window.items()}, "completed_in_window": in_window,
            "interactive_wait": wait, "batch_time": statistics.median(calls), "seconds": seconds,
            "jobs": {p: len(r) for p, r in records.items()}}


def rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    out = [("jobs", ", ".join(f"{p} {n}" for p, n in result["jobs"].items()) + f" in {result['seconds']:.1f} s")]
    for producer, share in result["share"].items():
        ok = "ok" if abs(share - 0.5) <= 0.10 else "outside 50% +- 10%"
        out.append((f"share {producer}", f"{share:.0%} of {sum(result['completed_in_window'].values())} completed "
                                         f"while both waited ({ok})"))
    ok = "ok" if result["interactive_wait"] <= result["batch_time"] else "over one batch time"
    out.append(("interactive wait", f"{result['interactive_wait']:.2f} s (one batch: {result['batch_time']:.2f} s; "
                                    f"{ok})"))
    return out


def _wait_for_completions(client: Any, job_ids: list[str], count: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = client.jobs.get_many(job_ids)
        if sum(1 for r in records if r is not None and r.status.is_terminal) >= count:
            return
        time.sleep(0.05)
    raise TimeoutError(f"fewer than {count} jobs completed in {timeout} s")


def _png(image: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


if __name__ == "__main__":
    main()
