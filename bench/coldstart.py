"""Cold start: from `darkroom worker` to the first result, with the job already queued.

    .venv/bin/python bench/coldstart.py [--rounds 3] [--variants eager,compile-cold,compile-warm] [--imports]

Starts its own Redis and S3 server once (in a temporary folder), builds the tiny model, then for every
round and variant: queues one img2img job for a model no worker serves yet, starts `darkroom worker`
(`python -m darkroom.worker worker`) as a subprocess and times from just before the process is spawned
to the moment the SDK's `JobHandle.wait` returns the job's result; then stops the worker (SIGTERM).
Variants, interleaved within each round so that a change in the machine's load hits all of them alike:

- eager: `darkroom worker --model cold=<tiny model>`, a fresh state folder (nothing cached);
- compile-cold: DARKROOM_COMPILE=true with DARKROOM_COMPILE_WARMUP_SIZES set to the job's size (the
  worker compiles that shape as the model loads, before it is ready), a fresh state folder:
  torch.compile's cache is empty;
- compile-warm: the same, restarted on the state folder compile-cold just used, so the worker finds
  the kernels compile-cold built in its cache folder (<state>/cache/torch-compile);
- baseline (only with --baseline-tree DIR): eager, but the worker runs the sources of another checkout
  DIR (e.g. the main branch before a change), for a before/after comparison within one run. An older
  checkout may log no start-up line: then only its total and CPU time are shown;
- baseline-compile-cold, baseline-compile-warm (with --baseline-tree DIR): compile-cold and compile-warm
  with the other checkout's sources, on state folders of their own (e.g. `--variants
  compile-warm,baseline-compile-warm --baseline-tree ../main`: each fills its own cache once, then the
  two warm starts alternate).

Where the seconds go, from the worker's own records: its start-up line (`ready N s after the process
started: interpreter, imports, services, models, consumer`, see darkroom.worker.startup) and the job's
result timings:

  interpreter  process start -> the `worker` command runs (Python, click, the darkroom CLI)
  imports      libraries (torch, diffusers, Celery, boto3, ...) and the worker's modules
  services     settings, device, S3/Redis clients, safety checker, start-up checks, Redis ping
  models       preloading the model (pipeline classes, weights, placement; compiled: the warm-up)
  consumer     heartbeat, fair-share feeder, metrics server, Celery start until ready
  first call   the job's pipeline call (timings.inference; compiles here for a shape not warmed up)
  upload       encoding and storing the image, its thumbnail and result.json
  rest of job  download, decode, safety check, batch wait
  remainder    spawning the process, the message's pickup, the result's notification to the SDK

Each run also records the worker's CPU time (user + system, all threads) until the result: unlike
wall time it barely moves with the machine's load, so on a shared machine it is the steadier figure
(with --threads 1 it is close to what the wall time would be on an idle machine).

`--imports` adds one unmeasured eager start under `python -X importtime` and prints the packages whose
imports cost the most (self time). Every figure is the median over `--rounds`, with its min-max; the
machine's load average (1 min) is printed next to each run. Targets (tiny model, idle machine):
eager <= 6 s, compiled with a warm cache <= 10 s.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import _common  # quiets libraries before they load; shared helpers
from _common import table

VARIANTS = ("eager", "compile-cold", "compile-warm", "baseline", "baseline-compile-cold", "baseline-compile-warm")
DEFAULT_VARIANTS = "eager,compile-cold,compile-warm"
TARGETS = {"eager": 6.0, "compile-warm": 10.0}
START_STAGES = ("interpreter", "imports", "services", "models", "consumer")
JOB_STAGES = ("first call", "upload", "rest of job", "remainder")
MODEL_ID = "cold"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every variant")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=20, help="num_inference_steps (int(steps x strength) run)")
    parser.add_argument("--strength", type=float, default=0.75)
    parser.add_argument("--size", type=int, default=64, help="input side in pixels")
    parser.add_argument("--full-size", action="store_true",
                        help="SD 1.5's architecture with random weights (about 2 GB of fp16 files, loaded as float32 "
                             "on a CPU) instead of the tiny model; try --steps 2 --strength 0.5 on a CPU")
    parser.add_argument("--threads", type=int, default=None,
                        help="DARKROOM_CPU_THREADS of the workers (default: all cores)")
    parser.add_argument("--safety", default="opennsfw", choices=["opennsfw", "none"],
                        help="DARKROOM_SAFETY_CHECKER of the workers (default: the worker's default, opennsfw)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one run may take before it fails")
    parser.add_argument("--imports", action="store_true",
                        help="also run one eager start under python -X importtime and print the costliest imports")
    parser.add_argument("--top", type=int, default=12, help="packages listed by --imports")
    parser.add_argument("--baseline-tree", type=Path, default=None,
                        help="a checkout whose common/, producer/, worker/ and dev/ sources the baseline variants "
                             "run ('baseline', eager, is added to --variants when no baseline variant is named)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the workers' logs and state in this folder")
    parser.add_argument("--json", action="store_true", help="also print the measurements as JSON")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.baseline_tree is not None and not any(map(is_baseline, variants)):
        variants.append("baseline")
    if any(map(is_baseline, variants)) and args.baseline_tree is None:
        parser.error("the baseline variants need --baseline-tree DIR (a checkout to compare with)")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        parser.error(f"--variants {args.variants!r}: unknown {', '.join(unknown) or '(none given)'}; "
                     f"allowed: {', '.join(VARIANTS)}")
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: must be at least 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the worker and the services on the way out
    report = run(args, variants)
    print(table(report["rows"]))
    if report.get("imports"):
        print(table(report["imports"]))
    if args.json:
        print(json.dumps({"runs": report["runs"], "summary": report["summary"]}))


# -- the run ------------------------------------------------------------------------------------------
def run(args: argparse.Namespace, variants: list[str]) -> dict[str, Any]:
    from _models import make_model

    from darkroom.producer.client import Client

    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    imports: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = args.keep or Path(tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        with _common.embedded_services(tmp) as (endpoints, settings):
            print(f"building the {'full-size' if args.full_size else 'tiny'} model ...", file=sys.stderr)
            model = make_model(tmp / ("model-full" if args.full_size else "model"), full_size=args.full_size,
                               device="cpu")
            with Client(settings) as client:
                source = upload_input(client, args.size)
                bench = ColdStart(args, client, endpoints.as_env(), model, source, tmp)
                for warm in (v for v in variants if v.endswith("compile-warm")):
                    cold = warm.replace("-warm", "-cold")
                    if cold not in variants:
                        bench.once(cold, tmp / state_folder(warm, 0))  # fills the cache the warm variant starts with
                for round_ in range(args.rounds):
                    for variant in variants:
                        state = tmp / state_folder(variant, round_)
                        if variant.endswith("compile-warm") and variant.replace("-warm", "-cold") not in variants:
                            state = tmp / state_folder(variant, 0)
                        result = bench.once(variant, state)
                        runs[variant].append(result)
                        print(f"round {round_ + 1}: {variant}: {result['wall']:.2f} s to the first result "
                              f"(load average {result['load']:.2f})", file=sys.stderr)
                if args.imports:
                    imports = bench.importtime(args.top)
    return {"rows": rows(args, runs), "runs": runs, "summary": summary(runs), "imports": imports}


def is_baseline(variant: str) -> bool:
    """Whether ``variant`` runs the --baseline-tree checkout's sources."""
    return variant.startswith("baseline")


def state_folder(variant: str, round_: int) -> str:
    """The state folder of ``variant`` in ``round_``: a compile-warm start shares its compile-cold's (same tree)."""
    if "compile" in variant:
        return f"state-{'baseline-' if is_baseline(variant) else ''}compile-{round_}"
    return f"state-{variant}-{round_}"


def upload_input(client: Any, size: int) -> str:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    data = io.BytesIO()
    Image.fromarray(pixels).save(data, format="PNG")
    uri: str = client.upload(data.getvalue(), "s3://darkroom/bench/coldstart-input.png")
    return uri


class ColdStart:
    """One measured cold start: queue a job, spawn a worker, wait for the result, stop the worker."""

    def __init__(self, args: argparse.Namespace, client: Any, service_env: dict[str, str], model: Path, source: str,
                 tmp: Path) -> None:
        self.args, self.client, self.service_env = args, client, service_env
        self.model, self.source, self.tmp = model, source, tmp

    def env(self, variant: str, state: Path) -> dict[str, str]:
        env = {**os.environ, **self.service_env, "DARKROOM_STATE_DIR": str(state),
               "DARKROOM_METRICS_PORT": str(free_port()), "DARKROOM_SAFETY_CHECKER": self.args.safety,
               "DARKROOM_COMPILE": "true" if "compile" in variant else "false",
               # a first compiled call on a loaded CPU can outlast the default job time limit (120 s base)
               "DARKROOM_JOB_TIME_BASE_SECONDS": str(self.args.timeout),
               "DARKROOM_COMPILE_WARMUP_SIZES": f"{self.args.size}x{self.args.size}"}
        env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # the worker's own cache folder, under its state folder
        if is_baseline(variant):
            tree = self.args.baseline_tree.resolve()
            env["PYTHONPATH"] = os.pathsep.join(str(tree / part) for part in ("common", "producer", "worker", "dev"))
        if self.args.threads:
            env["DARKROOM_CPU_THREADS"] = str(self.args.threads)
        return env

    def argv(self) -> list[str]:
        return ["-m", "darkroom.worker", "worker", "--model", f"{MODEL_ID}={self.model}", "--log-level", "info"]

    def submit(self) -> Any:
        return self.client.submit({"model": MODEL_ID, "image": self.source, "prompt": "a lighthouse at dusk",
                                   "seed": 7, "strength": self.args.strength,
                                   "num_inference_steps": self.args.steps,
                                   "output_prefix": "s3://darkroom/bench-coldstart"})

    def once(self, variant: str, state: Path, python_flags: tuple[str, ...] = ()) -> dict[str, Any]:
        from darkroom.worker.startup import parse_ready_line, process_started_at

        handle = self.submit()  # queued before any worker serves the model
        name = f"cold-{variant}-{uuid.uuid4().hex[:6]}"
        log_path = self.tmp / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**self.env(variant, state), "DARKROOM_WORKER_NAME": name}
        load = os.getloadavg()[0]
        with open(log_path, "wb") as log:
            spawned = time.time()
            proc = subprocess.Popen([sys.executable, *python_flags, *self.argv()], env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
        try:
            started = process_started_at(proc.pid)
            result = wait_while_alive(handle, proc, self.args.timeout)
            done = time.time()
            cpu = cpu_seconds(proc.pid)
        except Exception as exc:
            raise SystemExit(f"{variant}: no result ({exc}); see {log_path}:\n{tail(log_path)}") from None
        finally:
            stop(proc)
        text = log_path.read_text(errors="replace")
        ready = next((parsed for line in text.splitlines() if (parsed := parse_ready_line(line))), None)
        if ready is None and not is_baseline(variant):
            raise SystemExit(f"{variant}: the worker logged no start-up line; see {log_path}:\n{tail(log_path)}")
        ready_total, stages = ready or (0.0, {})
        t = result.timings
        job = {"first call": t.inference, "upload": t.encode + t.upload,
               "rest of job": max(0.0, t.total - t.inference - t.encode - t.upload)}
        wall = done - spawned
        job["remainder"] = max(0.0, wall - ready_total - sum(job.values()))  # spawn, pickup, notification
        if ready is None:  # no stages known: the whole time is the remainder
            job = {"first call": 0.0, "upload": 0.0, "rest of job": 0.0, "remainder": wall}
        return {"variant": variant, "wall": wall, "cpu": cpu, "load": load, "ready": ready_total,
                "spawn": None if started is None else started - spawned, **{s: stages.get(s, 0.0) for s in START_STAGES},
                **job, "model_load_in_job": t.model_load, "log": str(log_path), "output": text if python_flags else ""}

    def importtime(self, top: int) -> list[tuple[str, str]]:
        """One eager start under ``python -X importtime``: import self time by top-level package."""
        print("one more eager start under python -X importtime ...", file=sys.stderr)
        state = self.tmp / "state-importtime"
        result = self.once("eager", state, ("-X", "importtime"))
        shutil.rmtree(state, ignore_errors=True)
        return import_rows(result["output"], top, result["imports"])


def import_rows(text: str, top: int, measured_imports: float) -> list[tuple[str, str]]:
    """Rows of ``-X importtime`` output: self time summed by top-level package, the largest ``top`` first."""
    by_package: Counter[str] = Counter()
    modules: Counter[str] = Counter()
    for line in text.splitlines():
        found = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if found:
            package = found.group(2).split(".")[0]
            by_package[package] += int(found.group(1))
            modules[package] += 1
    total = sum(by_package.values()) / 1e6
    rows = [("imports (python -X importtime)", f"{total:.2f} s in {sum(modules.values())} modules (importtime "
                                                f"slows imports: the start-up line said imports {measured_imports:.2f} s)")]
    for package, micros in by_package.most_common(top):
        rows.append((f"  {package}", f"{micros / 1e6:6.2f} s  {modules[package]:5d} modules"))
    return rows


def wait_while_alive(handle: Any, proc: subprocess.Popen[bytes], timeout: float) -> Any:
    """The job's result (``JobHandle.wait``), or an error as soon as the worker process has exited."""
    from darkroom.common.errors import WaitTimeout

    deadline = time.monotonic() + timeout
    while True:
        try:
            return handle.wait(timeout=min(2.0, max(0.1, deadline - time.monotonic())))
        except WaitTimeout:
            if proc.poll() is not None:
                raise RuntimeError(f"the worker exited with {proc.returncode} before the result") from None
            if time.monotonic() > deadline:
                raise


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used so far (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as handle:
        stat = handle.read()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def stop(proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# -- output -------------------------------------------------------------------------------------------
def spread(values: list[float]) -> str:
    median = statistics.median(values)
    return f"{median:6.2f} s" + (f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else "")


def summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return {variant: {key: statistics.median(r[key] for r in results)
                      for key in ("wall", "cpu", "load", *START_STAGES, *JOB_STAGES)}
            for variant, results in runs.items() if results}


def rows(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str]]:
    loads = [r["load"] for results in runs.values() for r in results]
    out = [("job", f"{'SD 1.5 shapes' if args.full_size else 'tiny model'}, {args.size}x{args.size}, {int(args.steps * args.strength)} denoising steps, "
                   f"safety {args.safety}, {args.rounds} round(s) interleaved"
                   f"{f', {args.threads} torch thread(s)' if args.threads else ''}; load average (1 min) "
                   f"{min(loads):.2f}-{max(loads):.2f}, {os.cpu_count()} CPUs")]
    for variant, results in runs.items():
        walls = [r["wall"] for r in results]
        target = TARGETS.get(variant)
        verdict = "" if target is None else (f"   target <= {target:.0f} s: "
                                             f"{'met' if statistics.median(walls) <= target else 'NOT met'} (median)")
        out.append((f"{variant}: to the first result", spread(walls) + verdict))
        out.append(("  worker CPU time", spread([r["cpu"] for r in results])))
        if any(r["ready"] for r in results):  # stages known (the worker logged its start-up line)
            for stage in (*START_STAGES, *JOB_STAGES):
                out.append((f"  {stage}", spread([r[stage] for r in results])))
    if "eager" in runs:
        for variant in ("compile-cold", "compile-warm", "baseline"):
            if variant in runs:
                for key in ("wall", "cpu"):
                    pairs = zip(runs["eager"], runs[variant], strict=False)
                    if variant == "baseline":  # after / before
                        name, ratios = "eager / baseline", [e[key] / r[key] for e, r in pairs]
                    else:
                        name, ratios = f"{variant} / eager", [r[key] / e[key] for e, r in pairs]
                    out.append((f"{name} ({'time' if key == 'wall' else 'CPU time'})",
                                f"{statistics.median(ratios):.2f}"
                                + (f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else "")))
    out += after_before(runs)
    if "compile-cold" in runs and "compile-warm" in runs:
        saved = [c["first call"] - w["first call"] for c, w in zip(runs["compile-cold"], runs["compile-warm"],
                                                                     strict=False)]
        out.append(("warm cache saves (first call)", spread(saved)))
    return out


def after_before(runs: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str]]:
    """This tree's compiled starts divided by the --baseline-tree's, round by round (time and CPU time)."""
    out = []
    for variant in ("compile-cold", "compile-warm"):
        if variant in runs and f"baseline-{variant}" in runs:
            for key in ("wall", "cpu"):
                ratios = [a[key] / b[key] for a, b in zip(runs[variant], runs[f"baseline-{variant}"], strict=False)]
                out.append((f"{variant} / baseline-{variant} ({'time' if key == 'wall' else 'CPU time'})",
                            f"{statistics.median(ratios):.2f}"
                            + (f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else "")))
    return out


if __name__ == "__main__":
    main()
