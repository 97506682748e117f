"""Mixed-adapter batching benchmark: the same LoRA jobs three ways, side by side in one run.

    .venv/bin/python bench/mixed_lora.py [--jobs 40] [--adapters 10] [--size 64] [--steps 20] [--strength 0.75]

Starts its own Redis and S3 server in a temporary folder, builds the tiny model and ``--adapters`` LoRAs
(every third also on the text encoder), uploads them and one distinct input per job, and gives every
job one adapter drawn uniformly at random (weight 1.0). Each variant is a real worker process
(``darkroom worker``) with every adapter resident (DARKROOM_MAX_ADAPTERS = --adapters, loaded by a
warm-up), timed from the first submit to the last committed result:

- (a) sequential single jobs, switching adapters between them (DARKROOM_BATCH_MAX_IMAGES=1);
- (b) batching only jobs with identical adapter sets (DARKROOM_MIXED_ADAPTERS=false, batch --batch);
- (c) mixed-adapter batching (DARKROOM_MIXED_ADAPTERS=true, batch --batch), peft's LoRA layers routed by hooks;
- (s) the same with adapters held in slots (DARKROOM_ADAPTER_LAYERS=slots, DARKROOM_LORA_MAX_RANK=4: the
  LoRAs' rank), the path a compiled worker takes.

Prints images/s, the ratios c/a, c/b and s/c (slots replace the hooks everywhere only if s/c >= 0.95), each worker's peak RSS, and where each job's time went
(mean call size, inference, batch wait). Targets on a 2-core CPU machine (tiny model, 64x64):
c/a >= 1.8, c/b >= 1.3.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import _common  # quiets libraries before they load; shared helpers
from _common import table

TARGETS = {"c/a": 1.8, "c/b": 1.3}
NAMES = {"a": "(a) single jobs, adapter switching", "b": "(b) batching identical adapter sets",
         "c": "(c) mixed-adapter batching", "s": "(s) mixed-adapter batching, adapters in slots"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=40, help="jobs per variant")
    parser.add_argument("--adapters", type=int, default=10, help="distinct LoRAs, assigned uniformly at random")
    parser.add_argument("--size", type=int, default=64, help="input side in pixels")
    parser.add_argument("--steps", type=int, default=20, help="num_inference_steps (int(steps x strength) run)")
    parser.add_argument("--strength", type=float, default=0.75)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--batch", type=int, default=8, help="DARKROOM_BATCH_MAX_IMAGES for (b) and (c)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None,
                        help="DARKROOM_CPU_THREADS of every worker (default: all cores); 1 keeps a CPU shared with "
                             "other work from stalling torch's thread pool")
    parser.add_argument("--seed", type=int, default=0, help="seed of the adapter assignment")
    parser.add_argument("--skip", default="", help="variants to skip, e.g. a")
    parser.add_argument("--json", action="store_true", help="also print the measurements as JSON")
    args = parser.parse_args()
    measured = run(args)
    print(table(rows(args, measured)))
    if args.json:
        print(json.dumps(measured))


def run(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    from darkroom.dev.tiny import make_tiny_lora, make_tiny_model
    from darkroom.producer.client import Client

    measured: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        with _common.embedded_services(tmp) as (endpoints, settings):
            print(f"building the model and {args.adapters} LoRAs ...", file=sys.stderr)
            model = make_tiny_model(tmp / "model")
            with Client(settings) as client:
                loras = [client.upload(make_tiny_lora(model, tmp / f"lora{i}.safetensors", seed=100 + i,
                                                      text_encoder=i % 3 == 0).read_bytes(),
                                       f"s3://darkroom/bench-loras/lora{i}.safetensors")
                         for i in range(args.adapters)]
                jobs = make_jobs(client, args, loras)
                warmup = [{**jobs[0], "adapters": [{"uri": uri}], "job_id": None} for uri in loras]
                variants = {"a": {"DARKROOM_BATCH_MAX_IMAGES": "1"},
                            "b": {"DARKROOM_BATCH_MAX_IMAGES": str(args.batch), "DARKROOM_MIXED_ADAPTERS": "false"},
                            "c": {"DARKROOM_BATCH_MAX_IMAGES": str(args.batch), "DARKROOM_MIXED_ADAPTERS": "true"},
                            "s": {"DARKROOM_BATCH_MAX_IMAGES": str(args.batch), "DARKROOM_MIXED_ADAPTERS": "true",
                                  "DARKROOM_ADAPTER_LAYERS": "slots", "DARKROOM_LORA_MAX_RANK": "4"}}
                for label, extra in variants.items():
                    if label in args.skip:
                        continue
                    measured[label] = run_variant(args, client, endpoints, model, jobs, warmup, extra, tmp)
                    rate = len(jobs) / measured[label]["seconds"]
                    print(f"{NAMES[label]}: {rate:.2f} images/s", file=sys.stderr)
    return measured


def make_jobs(client: Any, args: argparse.Namespace, loras: list[str]) -> list[dict[str, Any]]:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(args.seed)
    jobs = []
    for index in range(args.jobs):
        png = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)).save(png, format="PNG")
        uri = client.upload(png.getvalue(), f"s3://darkroom/bench-inputs/{index:05d}.png")
        adapter = loras[int(rng.integers(len(loras)))]
        jobs.append({"model": "bench", "image": uri, "prompt": f"a lighthouse at dusk, variant {index}",
                     "seed": 1000 + index, "strength": args.strength, "num_inference_steps": args.steps,
                     "guidance_scale": args.guidance, "adapters": [{"uri": adapter, "weight": 1.0}],
                     "output_prefix": "s3://darkroom/bench-out"})
    return jobs


def run_variant(args: argparse.Namespace, client: Any, endpoints: Any, model: Path, jobs: list[dict[str, Any]],
                warmup: list[dict[str, Any]], extra: dict[str, str], tmp: Path) -> dict[str, Any]:
    from darkroom.dev.process import WorkerProcess

    name = f"bench-mixed-{uuid.uuid4().hex[:6]}"
    env = {**endpoints.as_env(), "DARKROOM_STATE_DIR": str(tmp / name), "DARKROOM_METRICS_PORT": "0",
           "DARKROOM_DEVICE": args.device, "DARKROOM_SAFETY_CHECKER": "none",
           "DARKROOM_MAX_ADAPTERS": str(args.adapters), **extra}
    if args.threads:
        env["DARKROOM_CPU_THREADS"] = str(args.threads)
    worker = WorkerProcess(name, ["--model", f"bench={model}", "--loglevel", "WARNING"], env=env,
                           redis_url=env["DARKROOM_REDIS_URL"], log_path=tmp / f"{name}.log").start(timeout=600)

    def submit(batch: list[dict[str, Any]]) -> list[Any]:
        return client.submit_many([{k: v for k, v in job.items() if v is not None} for job in batch])

    try:
        for handle in submit(warmup):  # every adapter loaded, first calls made
            handle.wait(timeout=600)
        started = time.perf_counter()
        results = [handle.wait(timeout=3600) for handle in submit(jobs)]
        seconds = time.perf_counter() - started
        calls = [r.parameters.get("batch", {}).get("jobs", 1) for r in results]
        return {
            "seconds": seconds, "peak_rss": _common.peak_rss_bytes(worker.pid), "mean_call_jobs": sum(calls) / len(calls),
            "routing": dict(collections.Counter(r.parameters.get("adapter_routing", "?") for r in results)),
            **{f"mean_{stage}": sum(getattr(r.timings, stage) for r in results) / len(results)
               for stage in ("batch_wait", "adapters", "inference", "encode", "upload")},
        }
    finally:
        worker.stop()


def rows(args: argparse.Namespace, measured: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    rate = {k: args.jobs / v["seconds"] for k, v in measured.items()}
    out = [("jobs", f"{args.jobs} x {args.size}x{args.size}, {int(args.steps * args.strength)} denoising steps, "
                    f"{args.adapters} LoRAs assigned uniformly at random, tiny model on {args.device}"
                    f"{f', {args.threads} torch thread(s)' if args.threads else ''}")]
    for label, value in measured.items():
        routing = ", ".join(f"{k} {v}" for k, v in sorted(value["routing"].items()))
        out.append((NAMES[label], f"{rate[label]:7.2f} images/s  ({value['seconds']:.2f} s, peak RSS "
                                  f"{value['peak_rss'] / 2**20:,.0f} MiB; mean call {value['mean_call_jobs']:.1f} "
                                  f"jobs ({routing}); per job: inference {value['mean_inference']:.3f} s, "
                                  f"adapters {value['mean_adapters'] * 1000:.1f} ms, batch wait "
                                  f"{value['mean_batch_wait']:.3f} s)"))
    out += _common.ratio_rows(rate, {"c/a": ("c", "a"), "c/b": ("c", "b"), "b/a": ("b", "a"), "s/c": ("s", "c")},
                              TARGETS)
    return out


if __name__ == "__main__":
    main()
