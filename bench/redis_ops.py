"""Redis operations per job: count them through a real simulated worker, then what one primary carries.

    .venv/bin/python bench/redis_ops.py [--jobs 200] [--idle 20] [--benchmark]

Starts its own embedded Redis and S3 server and one ``darkroom worker --simulate`` (real Celery, leases,
lifecycle, heartbeats; the pipeline only sleeps). Then, with ``CONFIG RESETSTAT`` before each phase and
``INFO commandstats`` after:

1. idle: the worker alone for ``--idle`` seconds (heartbeats, fair-share feeder, Celery's polling): ops/s per
   idle worker;
2. jobs: ``--jobs`` jobs (half ``submit_many`` bulk, half ``submit`` interactive, a quarter with a LoRA), from
   submission to the SDK reading the result; minus the idle rate over the same time: ops per job.

Prints each command's calls per job and Redis's own CPU microseconds per job (``usec`` of commandstats, which
leaves out reading and writing the sockets). With ``--benchmark``, runs the system's ``redis-benchmark`` against
the same server for the commands that dominate, to turn ops per job into jobs/s for one primary.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from darkroom.dev.process import WorkerProcess
from darkroom.producer.client import Client

PROFILE = {"name": "redis-ops", "memory_budget_bytes": 10_000, "adapter_load_seconds": 0.01,
           "default_model": {"bytes": 1000, "load_seconds": 0.05}, "models": {"m1": {"bytes": 1000}},
           "step_seconds": {"64x64": {"1": 0.002, "8": 0.004}}}


def commandstats(client: Any) -> dict[str, tuple[int, float]]:
    """command -> (calls, usec) since the last CONFIG RESETSTAT."""
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): (int(v["calls"]), float(v["usec"])) for name, v in stats.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of the idle phase")
    parser.add_argument("--benchmark", action="store_true", help="also run redis-benchmark on the same server")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    from darkroom.common.settings import Settings
    from darkroom.dev.demo import sample_image
    from darkroom.dev.embedded import EmbeddedServices

    with tempfile.TemporaryDirectory(prefix="darkroom-redis-ops-") as tmp:
        folder = Path(tmp)
        services = EmbeddedServices(folder / "services")
        endpoints = services.up(timeout=60)
        try:
            env = {**endpoints.as_env(), "DARKROOM_STATE_DIR": str(folder / "state"), "DARKROOM_METRICS_PORT": "0"}
            settings = Settings(state_dir=folder / "state", redis_url=env["DARKROOM_REDIS_URL"],
                                s3_endpoint_url=env["DARKROOM_S3_ENDPOINT_URL"],
                                s3_access_key_id=env["DARKROOM_S3_ACCESS_KEY_ID"],
                                s3_secret_access_key=env["DARKROOM_S3_SECRET_ACCESS_KEY"],
                                s3_region=env["DARKROOM_S3_REGION"])
            profile = folder / "profile.json"
            profile.write_text(json.dumps(PROFILE))
            worker = WorkerProcess("ops-worker", ["--simulate", str(profile), "--log-level", "warning"], env=env,
                                   redis_url=env["DARKROOM_REDIS_URL"], log_path=folder / "worker.log").start()
            client = Client(settings)
            redis = client.jobs.redis
            import io

            buffer = io.BytesIO()
            sample_image(64).save(buffer, format="PNG")
            image = client.upload(buffer.getvalue(), f"s3://darkroom/inputs/{uuid.uuid4().hex}.png")
            time.sleep(2)  # the worker's start-up writes are not part of the idle rate
            redis.config_resetstat()
            time.sleep(args.idle)
            idle = commandstats(redis)
            jobs = [{"model": "m1", "image": image, "prompt": f"a lighthouse {i}", "strength": 0.5,
                     "num_inference_steps": 8, "priority": "bulk" if i % 2 else "interactive",
                     **({"adapters": [{"uri": f"s3://darkroom/loras/l{i % 5}.safetensors"}]} if i % 4 == 0 else {})}
                    for i in range(args.jobs)]
            redis.config_resetstat()
            started = time.monotonic()
            handles = client.submit_many([j for j in jobs if j["priority"] == "bulk"])
            handles += [client.submit(j) for j in jobs if j["priority"] == "interactive"]
            for handle in handles:
                handle.wait(timeout=600)
            elapsed = time.monotonic() - started
            busy = commandstats(redis)
            worker.stop()
            client.close()
            rows = []
            for name in sorted(set(busy) | set(idle)):
                calls, usec = busy.get(name, (0, 0.0))
                idle_calls, idle_usec = idle.get(name, (0, 0.0))
                scale = elapsed / args.idle
                per_job = max(0.0, calls - idle_calls * scale) / args.jobs
                rows.append((name, per_job, max(0.0, usec - idle_usec * scale) / args.jobs, idle_calls / args.idle))
            rows.sort(key=lambda r: -r[1])
            total_ops = sum(r[1] for r in rows)
            total_usec = sum(r[2] for r in rows)
            idle_rate = sum(r[3] for r in rows)
            print(f"{args.jobs} jobs in {elapsed:.1f} s through one simulated worker")
            print(f"{'command':<28}{'calls/job':>10}{'usec/job':>10}{'idle calls/s':>14}")
            for name, per_job, usec, idle_calls in rows:
                if per_job >= 0.05 or idle_calls >= 0.05:
                    print(f"{name:<28}{per_job:>10.2f}{usec:>10.1f}{idle_calls:>14.2f}")
            print(f"{'total':<28}{total_ops:>10.1f}{total_usec:>10.1f}{idle_rate:>14.2f}")
            bench: dict[str, float] = {}
            if args.benchmark and shutil.which("redis-benchmark"):
                bench = redis_benchmark(endpoints.as_env()["DARKROOM_REDIS_URL"])
                for test, rps in bench.items():
                    print(f"redis-benchmark {test:<12} {rps:>10.0f} requests/s")
            if args.json:
                args.json.write_text(json.dumps({"jobs": args.jobs, "elapsed": elapsed, "ops_per_job": total_ops,
                                                 "usec_per_job": total_usec, "idle_ops_per_s_per_worker": idle_rate,
                                                 "commands": rows, "redis_benchmark": bench}, indent=2))
        finally:
            services.down()
    return 0


def redis_benchmark(url: str) -> dict[str, float]:
    """requests/s of redis-benchmark (50 clients, no pipelining) for the commands a job uses most."""
    from urllib.parse import urlparse

    parsed = urlparse(url)
    base = ["redis-benchmark", "-h", parsed.hostname or "127.0.0.1", "-p", str(parsed.port or 6379), "-q",
            "-n", "100000", "-c", "50", "--csv"]
    if parsed.password:
        base += ["-a", parsed.password]
    out: dict[str, float] = {}
    result = subprocess.run([*base, "-t", "set,get,lpush,rpop,hset,zadd,xadd"], capture_output=True, text=True,
                            timeout=600, check=False)
    for line in result.stdout.splitlines():
        parts = [p.strip('"') for p in line.split(",")]
        if len(parts) >= 2 and parts[0] != "test":
            try:
                out[parts[0]] = float(parts[1])
            except ValueError:
                continue
    script = "redis.call('HSET', KEYS[1], 'a', ARGV[1]); redis.call('EXPIRE', KEYS[1], 60); return 1"
    result = subprocess.run([*base, "eval", script, "1", "bench:key:__rand_int__", "v"], capture_output=True,
                            text=True, timeout=600, check=False)
    for line in result.stdout.splitlines():
        parts = [p.strip('"') for p in line.split(",")]
        if len(parts) >= 2 and parts[0] != "test":
            try:
                out["EVAL(hset+expire)"] = float(parts[1])
            except ValueError:
                continue
    return out


if __name__ == "__main__":
    sys.exit(main())
