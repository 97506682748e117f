"""Compiled vs eager worker with LoRA adapters in slots: the same jobs, side by side in one run.

    .venv/bin/python bench/compiled.py [--jobs 200] [--adapters 6] [--slots 4] [--batch 8] [--steps 12]

Starts its own Redis and S3 server in a temporary folder, builds the tiny model and ``--adapters`` LoRAs
(every third also on the text encoder), and makes ``--jobs`` jobs with random adapter sets: none, one
adapter or a blend of two, weights drawn from 0.3 to 1.2. They are submitted in bursts of random size
(1 to ``--batch`` + 2), so calls of every batch size up to ``--batch`` occur, with mixed adapter sets. With
more adapters than ``--slots`` (``DARKROOM_MAX_ADAPTERS``), slots are hot-swapped as the jobs go.

Each variant is a real ``darkroom worker`` process with ``DARKROOM_ADAPTER_LAYERS=slots``; the first job
is queued before the worker starts, so "cold start" is from process start to its first result:

- (e) eager;
- (k) ``DARKROOM_COMPILE=true`` with an empty compile cache (cold start only), then
- (w) compiled again with the cache (k) left behind: cold start, then every job.

Prints images/s of (e) and (w) and their ratio, cold start of each variant, recompiles after the warm-up
(the worker's ``darkroom_recompiles_total``; target 0), and the largest difference of any output pixel
between the compiled and the eager worker (target: at most 1 uint8 step).
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import _common  # quiets libraries before they load; shared helpers
from _common import table

NAMES = {"e": "(e) eager, adapters in slots", "k": "(k) compiled, empty compile cache",
         "w": "(w) compiled, warm compile cache"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200, help="jobs per measured variant (e and w)")
    parser.add_argument("--adapters", type=int, default=6, help="distinct LoRAs (rank 4)")
    parser.add_argument("--slots", type=int, default=4, help="DARKROOM_MAX_ADAPTERS (fewer than --adapters: "
                                                             "hot-swaps)")
    parser.add_argument("--batch", type=int, default=8, help="DARKROOM_BATCH_MAX_IMAGES (the worker's default, 8)")
    parser.add_argument("--size", type=int, default=64, help="input side in pixels (also the warm-up size)")
    parser.add_argument("--steps", type=int, default=12, help="num_inference_steps (int(steps x 0.75) run)")
    parser.add_argument("--threads", type=int, default=None, help="DARKROOM_CPU_THREADS of every worker")
    parser.add_argument("--seed", type=int, default=0, help="seed of the job mix")
    parser.add_argument("--json", action="store_true", help="also print the measurements as JSON")
    args = parser.parse_args()
    measured = run(args)
    print(table(rows(args, measured)))
    if args.json:
        print(json.dumps(measured))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from darkroom.dev.tiny import make_tiny_lora, make_tiny_model
    from darkroom.producer.client import Client

    measured: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        with _common.embedded_services(tmp) as (endpoints, settings), Client(settings) as client:
            print(f"building the model and {args.adapters} LoRAs ...", file=sys.stderr)
            model = make_tiny_model(tmp / "model")
            loras = [client.upload(make_tiny_lora(model, tmp / f"lora{i}.safetensors", seed=300 + i,
                                                  text_encoder=i % 3 == 0).read_bytes(),
                                   f"s3://darkroom/bench-loras/lora{i}.safetensors") for i in range(args.adapters)]
            jobs = make_jobs(client, args, loras)
            cache = tmp / "compile-cache"
            variants = {"e": {}, "k": {"DARKROOM_COMPILE": "true"}, "w": {"DARKROOM_COMPILE": "true"}}
            outputs: dict[str, list[Any]] = {}
            for label, extra in variants.items():
                env = {**extra, "TORCHINDUCTOR_CACHE_DIR": str(cache if label != "e" else tmp / "eager-cache")}
                measured[label], outputs[label] = run_variant(args, client, endpoints, model, jobs, env, tmp,
                                                              every_job=label != "k")
                print(f"{NAMES[label]}: cold start {measured[label]['cold_start']:.1f} s", file=sys.stderr)
            measured["max_pixel_difference"] = max_difference(client, outputs["e"], outputs["w"])
    return measured


def make_jobs(client: Any, args: argparse.Namespace, loras: list[str]) -> list[dict[str, Any]]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(args.seed)
    jobs = []
    for index in range(args.jobs + 1):  # job 0 is the cold-start job
        png = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)).save(png, format="PNG")
        uri = client.upload(png.getvalue(), f"s3://darkroom/bench-inputs/{index:05d}.png")
        count = int(rng.integers(0, 3))
        chosen = rng.choice(len(loras), size=count, replace=False)
        adapters = [{"uri": loras[int(i)], "weight": round(float(rng.uniform(0.3, 1.2)), 2)} for i in chosen]
        jobs.append({"model": "bench", "image": uri, "prompt": f"a lighthouse at dusk, variant {index}",
                     "seed": 2000 + index, "strength": 0.75, "num_inference_steps": args.steps,
                     "guidance_scale": 7.5, "adapters": adapters})
    return jobs


def run_variant(args: argparse.Namespace, client: Any, endpoints: Any, model: Path, jobs: list[dict[str, Any]],
                extra: dict[str, str], tmp: Path, *, every_job: bool) -> tuple[dict[str, Any], list[Any]]:
    import numpy as np

    from darkroom.dev.process import WorkerProcess

    name = f"bench-compiled-{uuid.uuid4().hex[:6]}"
    port = _free_port()
    env = {**endpoints.as_env(), "DARKROOM_STATE_DIR": str(tmp / name), "DARKROOM_METRICS_PORT": str(port),
           "DARKROOM_DEVICE": "cpu", "DARKROOM_SAFETY_CHECKER": "none", "DARKROOM_ADAPTER_LAYERS": "slots",
           "DARKROOM_LORA_MAX_RANK": "4", "DARKROOM_MAX_ADAPTERS": str(args.slots),
           "DARKROOM_BATCH_MAX_IMAGES": str(args.batch), "DARKROOM_COMPILE_WARMUP_SIZES": f"{args.size}x{args.size}",
           **extra}
    if args.threads:
        env["DARKROOM_CPU_THREADS"] = str(args.threads)
    prefix = f"s3://darkroom/bench-out/{name}"
    first = client.submit({**jobs[0], "output_prefix": prefix})  # queued before the worker exists
    worker = WorkerProcess(name, ["--model", f"bench={model}", "--loglevel", "WARNING"], env=env,
                           redis_url=env["DARKROOM_REDIS_URL"], log_path=tmp / f"{name}.log")
    started = time.perf_counter()
    worker.start(timeout=1800)
    try:
        first.wait(timeout=1800)
        measured: dict[str, Any] = {"cold_start": time.perf_counter() - started}
        if not every_job:
            return measured, []
        rng = np.random.default_rng(args.seed + 1)
        handles, started, rest = [], time.perf_counter(), jobs[1:]
        while rest:  # bursts of random size, so calls of every batch size occur
            burst = int(rng.integers(1, args.batch + 3))
            handles += client.submit_many([{**job, "output_prefix": prefix} for job in rest[:burst]])
            rest = rest[burst:]
            handles[-1].wait(timeout=3600)
        results = [h.wait(timeout=3600) for h in handles]
        measured["seconds"] = time.perf_counter() - started
        measured["recompiles"] = _metric(port, "darkroom_recompiles_total")
        calls = [r.parameters.get("batch", {}).get("jobs", 1) for r in results]
        measured["mean_call_jobs"] = sum(calls) / len(calls)
        measured["largest_call_jobs"] = max(calls)
        return measured, [r.uris[0] for r in results]
    finally:
        worker.stop()


def max_difference(client: Any, left: list[Any], right: list[Any]) -> int:
    """The largest |a - b| of any pixel between outputs of the same jobs."""
    import numpy as np
    from PIL import Image

    worst = 0
    for a, b in zip(left, right, strict=True):
        pa, pb = (np.asarray(Image.open(io.BytesIO(client.download(x)))).astype(int) for x in (a, b))
        worst = max(worst, int(np.abs(pa - pb).max()))
    return worst


def _metric(port: int, name: str) -> float | None:
    """One sample of the worker's /metrics, or None if it is not there."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:  # noqa: S310 - local
        for line in response.read().decode().splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rows(args: argparse.Namespace, measured: dict[str, Any]) -> list[tuple[str, str]]:
    out = [("jobs", f"{args.jobs} x {args.size}x{args.size}, {int(args.steps * 0.75)} denoising steps, "
                    f"{args.adapters} rank-4 LoRAs in {args.slots} slots (0-2 per job, weights 0.3-1.2), "
                    f"batches up to {args.batch}, tiny model on cpu"
                    f"{f', {args.threads} torch thread(s)' if args.threads else ''}")]
    rate = {k: args.jobs / v["seconds"] for k, v in measured.items() if isinstance(v, dict) and "seconds" in v}
    for label in ("e", "k", "w"):
        value = measured[label]
        detail = f"cold start {value['cold_start']:.1f} s"
        if label in rate:
            detail = (f"{rate[label]:7.2f} images/s  ({value['seconds']:.1f} s; mean call {value['mean_call_jobs']:.1f} "
                      f"jobs, largest {value['largest_call_jobs']}); {detail}")
        out.append((NAMES[label], detail))
    out += _common.ratio_rows(rate, {"compiled / eager (w/e)": ("w", "e")}, {})
    recompiles = measured["w"].get("recompiles")
    out.append(("recompiles after warm-up (w)", f"{recompiles:g}   target 0: {'met' if recompiles == 0 else 'NOT met'}"
                if recompiles is not None else "not reported"))
    worst = measured["max_pixel_difference"]
    out.append(("largest pixel difference w vs e", f"{worst}   target <= 1: {'met' if worst <= 1 else 'NOT met'}"))
    return out


if __name__ == "__main__":
    main()
