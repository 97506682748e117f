"""Throughput benchmark: the same N img2img jobs five ways, measured side by side in one run.

    .venv/bin/python bench/throughput.py [--jobs 48] [--steps 20] [--strength 0.75] [--size 64] [--batch 8] [--rounds 3]
    .venv/bin/python bench/throughput.py --device cuda --full-size      # SD 1.5 shapes, 512x512 fp16, on a GPU

Starts its own Redis and S3 server in a temporary folder, builds the model (the tiny one, or with
--full-size the real SD 1.5 architecture with random weights) and N distinct input images, then runs:

- (a) a bare diffusers loop in one process over in-memory inputs (the floor of overhead: no queue,
  no storage, no encoding);
- (b) a naive Celery task that fetches the input, loads the pipeline, runs it and uploads a PNG, per
  task (bench/_naive_celery.py);
- (c) Darkroom with batching off (DARKROOM_BATCH_MAX_IMAGES=1): a real worker process, jobs submitted
  with submit_many and waited for until each is ``succeeded`` (outputs stored and committed);
- (d) Darkroom with batching on (DARKROOM_BATCH_MAX_IMAGES=--batch);
- (e) a bare diffusers loop like (a), but over batches of --batch jobs (one call per batch, one generator
  per image): the in-process limit of what (d) can reach at that batch size.

Every variant is warmed up first (pipeline loaded, first call made) and timed from the first submit
to the last result. ``--rounds N`` runs the variants N times, interleaved (a, b, c, d, e, then again),
so a change in the machine's load hits every variant alike; each ratio is taken within a round and
printed as the median with its spread (min-max) over the rounds. Prints images/s, the ratios c/a, d/e,
d/a, e/a and a/b, and each variant's peak RSS. Targets on an idle machine: c/a >= 0.98, d/e >= 0.95
(each on an idle machine), d/a >= 2.5 (tiny model, 64x64, 2-core CPU). Darkroom runs without its safety checker (the
bare loops have none); --safety turns it on for (c) and (d).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
TARGETS = {"c/a": 0.98, "d/e": 0.95, "d/a": 2.5}
RATIOS = {"c/a": ("c", "a"), "d/e": ("d", "e"), "d/a": ("d", "a"), "e/a": ("e", "a"), "a/b": ("a", "b")}


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
    parser.add_argument("--family", default="sd", choices=["sd", "sdxl", "sd3", "flux"],
                        help="model family of the tiny model (b, the naive Celery worker, runs SD only: skipped "
                             "for the others)")
    parser.add_argument("--full-size", action="store_true", help="SD 1.5 architecture, random weights, fp16")
    parser.add_argument("--skip", default="", help="variants to skip, e.g. b")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved repetitions of every variant")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads of every variant (DARKROOM_CPU_THREADS of the workers; default: all "
                             "cores); 1 keeps a CPU shared with other work from stalling torch's thread pool")
    parser.add_argument("--safety", action="store_true", help="run Darkroom's default safety checker in (c), (d)")
    parser.add_argument("--json", action="store_true", help="also print the measurements as JSON")
    parser.add_argument("--bare-spec", type=Path, help=argparse.SUPPRESS)  # internal: run (a) in this process
    args = parser.parse_args()
    args.size = args.size or (512 if args.full_size else 64)
    if args.family != "sd" and "b" not in args.skip:
        args.skip += "b"
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: must be at least 1")
    if args.bare_spec:
        print(json.dumps(bare_loop(json.loads(args.bare_spec.read_text()))))
        return
    report = run(args)
    print(table(report["rows"]))
    if args.json:
        print(json.dumps({"measured": report["measured"], "ratios": report["ratios"]}))


# -- (a), (e) -----------------------------------------------------------------------------------------
def bare_loop(spec: dict[str, Any]) -> dict[str, Any]:
    """diffusers alone: one pipeline, inputs already decoded in memory, one call per ``spec["batch"]`` jobs
    (1 for (a); (e) passes lists of prompts, images and one generator per image, as Darkroom's engine does)."""
    import diffusers
    import torch
    from PIL import Image

    from darkroom.common.families import Family, img2img_class
    from darkroom.worker.inference.call import clip_skip_compat
    from darkroom.worker.registry import family_of_folder

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    dtype = torch.float16 if spec["device"].startswith("cuda") else torch.float32
    family = family_of_folder(Path(spec["model"])) or Family.SD
    extra = {"safety_checker": None, "requires_safety_checker": False} if family is Family.SD else {}
    pipe = getattr(diffusers, img2img_class(family)).from_pretrained(spec["model"], torch_dtype=dtype,
                                                                      **extra).to(spec["device"])
    pipe.set_progress_bar_config(disable=True)
    if family is Family.SD:
        clip_skip_compat(pipe.text_encoder)
    images = {path: Image.open(path).convert("RGB") for path in {job["path"] for job in spec["jobs"]}}
    side = next(iter(images.values())).size
    sized = {"width": side[0], "height": side[1]} if family in (Family.SD3, Family.FLUX) else {}

    def call(jobs: list[dict[str, Any]]) -> Any:
        first = jobs[0]
        if len(jobs) == 1:  # (a): exactly one plain call per job
            return pipe(prompt=first["prompt"], image=images[first["path"]], strength=first["strength"],
                        num_inference_steps=first["steps"], guidance_scale=first["guidance"],
                        generator=torch.Generator("cpu").manual_seed(first["seed"]), **sized).images
        return pipe(prompt=[j["prompt"] for j in jobs], image=[images[j["path"]] for j in jobs],
                    strength=first["strength"], num_inference_steps=first["steps"], guidance_scale=first["guidance"],
                    generator=[torch.Generator("cpu").manual_seed(j["seed"]) for j in jobs],
                    num_images_per_prompt=1, **sized).images

    batch = int(spec.get("batch", 1))
    jobs = spec["jobs"]
    chunks = [jobs[i : i + batch] for i in range(0, len(jobs), batch)]
    call(chunks[0])  # warm-up (this batch size)
    started = time.perf_counter()
    for chunk in chunks:
        call(chunk)
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

    measured: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        with _common.embedded_services(tmp) as (endpoints, settings):
            print("building the model ...", file=sys.stderr)
            model = make_model(tmp / "model", full_size=args.full_size, device=args.device, family=args.family)
            with Client(settings) as client:
                jobs = make_jobs(client, args, tmp / "inputs")
                for round_ in range(args.rounds):
                    for label in (v for v in "abcde" if v not in args.skip):
                        if label in ("a", "e"):
                            result = run_bare(args, model, jobs, tmp, batch=1 if label == "a" else args.batch)
                        elif label == "b":
                            result = run_naive(args, model, jobs, endpoints, tmp)
                        else:
                            result = run_darkroom(args, client, endpoints, model, jobs,
                                                  1 if label == "c" else args.batch, tmp)
                        measured.setdefault(label, []).append(result)
                        report_line(label, result, len(jobs), round_)
    return {"rows": rows(args, measured, len(jobs)), "measured": measured,
            "ratios": {name: ratio_spread(measured, top, bottom) for name, (top, bottom) in RATIOS.items()
                       if top in measured and bottom in measured}}


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


def run_bare(args: argparse.Namespace, model: Path, jobs: list[dict[str, Any]], tmp: Path,
             batch: int = 1) -> dict[str, float]:
    spec = tmp / "bare.json"
    spec.write_text(json.dumps({"model": str(model), "device": args.device, "jobs": jobs, "batch": batch,
                                "threads": args.threads}))
    out = subprocess.run([sys.executable, str(BENCH_DIR / "throughput.py"), "--bare-spec", str(spec)],
                         check=True, capture_output=True, text=True)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


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
    if args.threads:
        env["DARKROOM_CPU_THREADS"] = str(args.threads)
    name = f"bench-{batch}-{uuid.uuid4().hex[:6]}"
    worker = WorkerProcess(name, ["--model", f"bench={model}", "--loglevel", "WARNING"], env=env,
                           redis_url=env["DARKROOM_REDIS_URL"], log_path=tmp / f"{name}.log").start(timeout=600)

    def submit(batch_jobs: list[dict[str, Any]]) -> list[Any]:
        return list(client.submit_many([{"model": "bench", "image": j["uri"], "prompt": j["prompt"], "seed": j["seed"],
                                    "strength": j["strength"], "num_inference_steps": j["steps"],
                                    "guidance_scale": j["guidance"], "output_prefix": "s3://darkroom/bench-out"}
                                   for j in batch_jobs]))

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
         "d": "(d) Darkroom, batching on", "e": "(e) bare diffusers loop, batches"}


def report_line(label: str, result: dict[str, float], jobs: int, round_: int = 0) -> None:
    print(f"round {round_ + 1}: {NAMES[label]}: {jobs / result['seconds']:.2f} images/s", file=sys.stderr)


def ratio_spread(measured: dict[str, list[dict[str, float]]], top: str, bottom: str) -> dict[str, Any]:
    """``top`` ÷ ``bottom`` images/s within each round: median, min, max and every value."""
    values = [b["seconds"] / t["seconds"] for t, b in zip(measured[top], measured[bottom], strict=False)]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def rows(args: argparse.Namespace, measured: dict[str, list[dict[str, float]]], jobs: int) -> list[tuple[str, str]]:
    out = [("jobs", f"{jobs} x {args.size}x{args.size}, {int(args.steps * args.strength)} denoising steps, "
                    f"{'SD 1.5 shapes' if args.full_size else 'tiny model'} on {args.device}, batch {args.batch}, "
                    f"{args.rounds} round(s) interleaved{f', {args.threads} torch thread(s)' if args.threads else ''}{', ' + str(args.sources) + ' sources' if args.sources else ''}")]
    for label, results in measured.items():
        rates = [jobs / r["seconds"] for r in results]
        value = results[-1]
        extra = ""
        if "mean_batch" in value:
            extra = (f"; last round: mean batch {value['mean_batch']:.1f}, per job: inference "
                     f"{value['mean_inference']:.3f} s, batch wait {value['mean_batch_wait']:.3f} s, download+decode "
                     f"{value['mean_download'] + value['mean_decode']:.3f} s, encode+upload "
                     f"{value['mean_encode'] + value['mean_upload']:.3f} s")
        spread = f" ({min(rates):.2f}-{max(rates):.2f})" if len(rates) > 1 else ""
        out.append((NAMES[label], f"{statistics.median(rates):7.2f} images/s{spread}, peak RSS "
                                  f"{max(r['peak_rss'] for r in results) / 2**20:,.0f} MiB{extra}"))
    for name, (top, bottom) in RATIOS.items():
        if top in measured and bottom in measured:
            ratio = ratio_spread(measured, top, bottom)
            target = TARGETS.get(name)
            verdict = "" if target is None else (f"   target >= {target}: "
                                                 f"{'met' if ratio['median'] >= target else 'NOT met'} (median)")
            range_ = f" (min-max {ratio['min']:.3f}-{ratio['max']:.3f})" if len(measured[top]) > 1 else ""
            out.append((name, f"{ratio['median']:.3f}{range_}{verdict}"))
    return out


if __name__ == "__main__":
    main()
