"""Throughput benchmark (issue 8): the same N img2img jobs four ways, measured side by side in one run.

    .venv/bin/python bench/throughput.py [--jobs 48] [--steps 20] [--strength 0.75] [--size 64] [--batch 8]
    .venv/bin/python bench/throughput.py --device cuda --full-size      # SD 1.5 shapes, 512x512 fp16, on a GPU

Starts its own Redis and S3 server in a temporary folder, builds the model (the tiny one, or with
--full-size the real SD 1.5 architecture with random weights) and N distinct input images, then runs:

- (a) a bare diffusers loop in one process over in-memory inputs (the floor of overhead: no queue,
  no storage, no encoding);
- (b) a naive Celery task that fetches the input, loads the pipeline, runs it and uploads a PNG, per
  task (bench/_naive_celery.py);
- (c) Darkroom with batching off (DARKROOM_BATCH_MAX_IMAGES=1): a real worker process, jobs submitted
  with submit_many and waited for until each is ``succeeded`` (outputs stored and committed);
- (d) Darkroom with batching on (DARKROOM_BATCH_MAX_IMAGES=--batch).

Every variant is warmed up first (pipeline loaded, first call made) and timed from the first submit
to the last result. Prints images/s, the ratios c/a, d/a and a/b, and each variant's peak RSS.
Targets on a 2-core CPU machine (tiny model, 64x64): c/a >= 0.98, d/a >= 2.5. Darkroom runs without
its safety checker (the bare loop has none); --safety turns it on for (c) and (d).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import _common  # quiets libraries before they load; shared helpers
from _common import table

BENCH_DIR = Path(__file__).resolve().parent
TARGETS = {"c/a": 0.98, "d/a": 2.5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=48, help="jobs per variant")
    parser.add_argument("--steps", type=int, default=20, help="num_inference_steps (int(steps x strength) run)")
    parser.add_argument("--strength", type=float, default=0.75)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--size", type=int, default=None, help="input side in pixels (64; 512 with --full-size)")
    parser.add_argument("--batch", type=int, default=8, help="DARKROOM_BATCH_MAX_IMAGES for (d)")
    parser.add_argument("--sources", type=int, default=None,
                        help="distinct input images (default: one per job); fewer shows the latent cache")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--full-size", action="store_true", help="SD 1.5 architecture, random weights, fp16")
    parser.add_argument("--skip", default="", help="variants to skip, e.g. b")
    parser.add_argument("--safety", action="store_true", help="run Darkroom's default safety checker in (c), (d)")
    parser.add_argument("--json", action="store_true", help="also print the measurements as JSON")
    parser.add_argument("--bare-spec", type=Path, help=argparse.SUPPRESS)  # internal: run (a) in this process
    args = parser.parse_args()
    args.size = args.size or (512 if args.full_size else 64)
    if args.bare_spec:
        print(json.dumps(bare_loop(json.loads(args.bare_spec.read_text()))))
        return
    report = run(args)
    print(table(report["rows"]))
    if args.json:
        print(json.dumps(report["measured"]))


# -- (a) ----------------------------------------------------------------------------------------------
def bare_loop(spec: dict[str, Any]) -> dict[str, Any]:
    """diffusers alone: one pipeline, inputs already decoded in memory, one call per job."""
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    from darkroom.worker.inference.call import clip_skip_compat

    dtype = torch.float16 if spec["device"].startswith("cuda") else torch.float32
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(spec["model"], torch_dtype=dtype, safety_checker=None,
                                                          requires_safety_checker=False).to(spec["device"])
    pipe.set_progress_bar_config(disable=True)
    clip_skip_compat(pipe.text_encoder)
    images = {path: Image.open(path).convert("RGB") for path in {job["path"] for job in spec["jobs"]}}

    def call(job: dict[str, Any]) -> Any:
        return pipe(prompt=job["prompt"], image=images[job["path"]], strength=job["strength"],
                    num_inference_steps=job["steps"], guidance_scale=job["guidance"],
                    generator=torch.Generator("cpu").manual_seed(job["seed"])).images[0]

    call(spec["jobs"][0])  # warm-up
    started = time.perf_counter()
    for job in spec["jobs"]:
        call(job)
    _sync(spec["device"])
    return {"seconds": time.perf_counter() - started, "peak_rss": _common.peak_rss_bytes()}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# -- the run ------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    from _models import make_model

    from darkroom.producer.client import Client

    measured: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        with _common.embedded_services(tmp) as (endpoints, settings):
            print("building the model ...", file=sys.stderr)
            model = make_model(tmp / "model", full_size=args.full_size, device=args.device)
            with Client(settings) as client:
                jobs = make_jobs(client, args, tmp / "inputs")
                if "a" not in args.skip:
                    measured["a"] = run_bare(args, model, jobs, tmp)
                    report_line("a", measured["a"], len(jobs))
                if "b" not in args.skip:
                    measured["b"] = run_naive(args, model, jobs, endpoints, tmp)
                    report_line("b", measured["b"], len(jobs))
                for label, batch in (("c", 1), ("d", args.batch)):
                    if label not in args.skip:
                        measured[label] = run_darkroom(args, client, endpoints, model, jobs, batch, tmp)
                        report_line(label, measured[label], len(jobs))
    return {"rows": rows(args, measured, len(jobs)), "measured": measured}


def make_jobs(client: Any, args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    sources = []
    for index in range(args.sources or args.jobs):
        pixels = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
        path = folder / f"{index:05d}.png"
        Image.fromarray(pixels).save(path)
        sources.append((str(path), client.upload(path.read_bytes(), f"s3://darkroom/bench/{index:05d}.png")))
    return [{"path": sources[i % len(sources)][0], "uri": sources[i % len(sources)][1],
             "prompt": f"a lighthouse at dusk, variant {i}", "seed": 1000 + i, "strength": args.strength,
             "steps": args.steps, "guidance": args.guidance} for i in range(args.jobs)]


def run_bare(args: argparse.Namespace, model: Path, jobs: list[dict[str, Any]], tmp: Path) -> dict[str, float]:
    spec = tmp / "bare.json"
    spec.write_text(json.dumps({"model": str(model), "device": args.device, "jobs": jobs}))
    out = subprocess.run([sys.executable, str(BENCH_DIR / "throughput.py"), "--bare-spec", str(spec)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_naive(args: argparse.Namespace, model: Path, jobs: list[dict[str, Any]], endpoints: Any,
              tmp: Path) -> dict[str, float]:
    from celery import Celery

    env = endpoints.as_env()
    broker = env["DARKROOM_REDIS_URL"].rsplit("/", 1)[0] + "/3"
    child_env = {**os.environ, "NAIVE_BROKER": broker, "NAIVE_S3": env["DARKROOM_S3_ENDPOINT_URL"],
                 "NAIVE_KEY": env["DARKROOM_S3_ACCESS_KEY_ID"], "NAIVE_SECRET": env["DARKROOM_S3_SECRET_ACCESS_KEY"],
                 "PYTHONPATH": str(BENCH_DIR)}
    with open(tmp / "naive.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "_naive_celery", "worker", "--pool", "solo",
                                 "-Q", "naive", "--loglevel", "WARNING", "--without-gossip", "--without-mingle"],
                                cwd=BENCH_DIR, env=child_env, stdout=log, stderr=subprocess.STDOUT)
    app = Celery("naive-producer", broker=broker, backend=broker, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")

    def send(job: dict[str, Any]) -> Any:
        bucket, key = job["uri"][len("s3://"):].split("/", 1)
        return app.send_task("naive.img2img", queue="naive", args=[
            str(model), bucket, key, f"naive/{uuid.uuid4().hex}.png", job["prompt"], job["seed"], job["strength"],
            job["steps"], job["guidance"]])

    try:
        send(jobs[0]).get(timeout=600)  # warm-up: imports, first load
        started = time.perf_counter()
        for result in [send(job) for job in jobs]:
            result.get(timeout=3600)
        seconds = time.perf_counter() - started
        return {"seconds": seconds, "peak_rss": _common.peak_rss_bytes(proc.pid)}
    finally:
        proc.terminate()
        proc.wait(60)
        app.close()


def run_darkroom(args: argparse.Namespace, client: Any, endpoints: Any, model: Path, jobs: list[dict[str, Any]],
                 batch: int, tmp: Path) -> dict[str, float]:
    from darkroom.dev.process import WorkerProcess

    env = {**endpoints.as_env(), "DARKROOM_STATE_DIR": str(tmp / f"worker-{batch}"),
           "DARKROOM_BATCH_MAX_IMAGES": str(batch), "DARKROOM_METRICS_PORT": "0", "DARKROOM_DEVICE": args.device}
    if not args.safety:
        env["DARKROOM_SAFETY_CHECKER"] = "none"
    name = f"bench-{batch}-{uuid.uuid4().hex[:6]}"
    worker = WorkerProcess(name, ["--model", f"bench={model}", "--loglevel", "WARNING"], env=env,
                           redis_url=env["DARKROOM_REDIS_URL"], log_path=tmp / f"{name}.log").start(timeout=600)

    def submit(batch_jobs: list[dict[str, Any]]) -> list[Any]:
        return client.submit_many([{"model": "bench", "image": j["uri"], "prompt": j["prompt"], "seed": j["seed"],
                                    "strength": j["strength"], "num_inference_steps": j["steps"],
                                    "guidance_scale": j["guidance"], "output_prefix": "s3://darkroom/bench-out"}
                                   for j in batch_jobs])

    try:
        for handle in submit(jobs[: max(1, batch)]):  # warm-up: first calls at this batch size
            handle.wait(timeout=600)
        started = time.perf_counter()
        results = [handle.wait(timeout=3600) for handle in submit(jobs)]
        seconds = time.perf_counter() - started
        batch_sizes = [r.parameters.get("batch", {}).get("jobs", 1) for r in results]
        stages = {stage: sum(getattr(r.timings, stage) for r in results) / len(results)
                  for stage in ("download", "decode", "batch_wait", "inference", "encode", "upload")}
        return {"seconds": seconds, "peak_rss": _common.peak_rss_bytes(worker.pid),
                "mean_batch": sum(batch_sizes) / len(batch_sizes), **{f"mean_{k}": v for k, v in stages.items()}}
    finally:
        worker.stop()


# -- output -------------------------------------------------------------------------------------------
NAMES = {"a": "(a) bare diffusers loop", "b": "(b) naive Celery task", "c": "(c) Darkroom, batching off",
         "d": "(d) Darkroom, batching on"}


def report_line(label: str, result: dict[str, float], jobs: int) -> None:
    print(f"{NAMES[label]}: {jobs / result['seconds']:.2f} images/s", file=sys.stderr)


def rows(args: argparse.Namespace, measured: dict[str, dict[str, float]], jobs: int) -> list[tuple[str, str]]:
    rate = {k: jobs / v["seconds"] for k, v in measured.items()}
    out = [("jobs", f"{jobs} x {args.size}x{args.size}, {int(args.steps * args.strength)} denoising steps, "
                    f"{'SD 1.5 shapes' if args.full_size else 'tiny model'} on {args.device}"
                    f"{', ' + str(args.sources) + ' sources' if args.sources else ''}")]
    for label, value in measured.items():
        extra = ""
        if "mean_batch" in value:
            extra = (f", mean batch {value['mean_batch']:.1f}; per job: inference {value['mean_inference']:.3f} s, "
                     f"batch wait {value['mean_batch_wait']:.3f} s, download+decode "
                     f"{value['mean_download'] + value['mean_decode']:.3f} s, encode+upload "
                     f"{value['mean_encode'] + value['mean_upload']:.3f} s")
        out.append((NAMES[label], f"{rate[label]:7.2f} images/s  ({value['seconds']:.2f} s, peak RSS "
                                  f"{value['peak_rss'] / 2**20:,.0f} MiB{extra})"))
    out += _common.ratio_rows(rate, {"c/a": ("c", "a"), "d/a": ("d", "a"), "a/b": ("a", "b")}, TARGETS)
    return out


if __name__ == "__main__":
    main()
