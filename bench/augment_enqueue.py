"""Augmentation enqueue benchmark: jobs/s that one process expands from a grid and submits.

    .venv/bin/python bench/augment_enqueue.py [--sources 125] [--prompts 4] [--strengths 4] [--seeds 5] [--repeat 3]

Starts its own embedded Redis and S3 server in a temporary folder and uploads ``--sources`` small objects
under one prefix; needs no worker (the jobs stay queued). Measured from one process, in one run:

- grid expansion alone: cells (with their deterministic ids) per second, no I/O;
- the whole run up to the last job sent, as ``darkroom augment`` does it: list the sources, save the spec,
  read every cell's state (Redis MGET + one listing of the output prefix), validate every job, subscribe to
  each batch's event channels and send it (one atomic create script per job, pipelined), with a window as
  large as the grid; and each phase of it.

Each run checks that the broker's bulk list holds one message per job; ``--repeat`` runs (fresh grids) give
the median and the best. Target: >= 2,000 jobs/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import embedded_services

from darkroom.common.queues import broker_list, cold_queue
from darkroom.producer.augment import Augmentation, AugmentSpec, Progress, Source, expand
from darkroom.producer.client import Client

TARGET = 2000.0
MODEL = "bench-augment"


def spec_for(args: argparse.Namespace, sources: str, output: str, model: str) -> AugmentSpec:
    return AugmentSpec.build({
        "model": model, "sources": sources, "output_prefix": output,
        "prompts": [f"{{stem}}, style {i}" for i in range(args.prompts)],
        "strengths": [round(0.3 + 0.1 * i, 2) for i in range(args.strengths)],
        "seeds": list(range(args.seeds)), "fields": {"num_inference_steps": 30},
    })


def expansion_rate(spec: AugmentSpec, count: int) -> tuple[int, float]:
    sources = [Source(f"s3://darkroom/bench/{i:05d}.png", f"{i:032x}", f"{i:05d}.png") for i in range(count)]
    started = time.perf_counter()
    cells = expand(spec, sources)
    return len(cells), len(cells) / (time.perf_counter() - started)


class Clock:
    """Marks the phases of one run: plan read, first batch sent, last job sent."""

    def __init__(self, total: int, stop: threading.Event) -> None:
        self.total, self.stop = total, stop
        self.started = time.perf_counter()
        self.marks: dict[str, float] = {}

    def on_plan(self, _: Any) -> None:
        self.marks["planned"] = time.perf_counter() - self.started

    def on_progress(self, progress: Progress) -> None:
        if progress.submitted >= self.total and "sent" not in self.marks:
            self.marks["sent"] = time.perf_counter() - self.started
            self.stop.set()


def one_run(client: Client, args: argparse.Namespace, sources: str, index: int) -> tuple[float, float]:
    """Seconds to the plan and to the last job sent, for a fresh run (its own output prefix and model)."""
    spec = spec_for(args, sources, f"s3://darkroom/bench-augment-{index}", f"{MODEL}-{index}")
    total = args.sources * args.prompts * args.strengths * args.seeds
    stop = threading.Event()
    clock = Clock(total, stop)
    Augmentation(client, spec).run(window=total + 1, stop=stop, on_plan=clock.on_plan, on_progress=clock.on_progress)
    queued = int(client.jobs.redis.llen(broker_list(cold_queue(spec.model), 6)))
    assert queued == total, f"the bulk broker list holds {queued} messages, not {total}"
    client.jobs.redis.flushdb()
    return clock.marks["planned"], clock.marks["sent"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", type=int, default=125, help="source objects under the prefix")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--strengths", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3, help="runs, each of its own grid (median and best shown)")
    args = parser.parse_args()
    total = args.sources * args.prompts * args.strengths * args.seeds

    with tempfile.TemporaryDirectory() as tmp, embedded_services(Path(tmp)) as (_, settings), \
            Client(settings) as client:
        prefix = "s3://darkroom/bench-sources"
        for i in range(args.sources):
            client.upload(f"image {i}".encode(), f"{prefix}/{i:05d}.png")
        spec = spec_for(args, prefix + "/", "s3://darkroom/bench-augment", MODEL)
        cells, expand_rate = expansion_rate(spec, args.sources)
        runs = [one_run(client, args, prefix + "/", i) for i in range(args.repeat)]

    planned, sent = (statistics.median(x) for x in zip(*runs, strict=True))
    best = min(s for _, s in runs)
    rows = [
        ("grid", f"{args.sources} sources × {spec.describe()} = {total:,} jobs, {args.repeat} runs"),
        ("grid expansion", f"{expand_rate:10,.0f} cells/s   ({cells:,} cells with ids, no I/O)"),
        ("list + plan", f"{planned:10.2f} s      (list sources, save spec, MGET states, list outputs; median)"),
        ("validate + send", f"{sent - planned:10.2f} s      (prepare every job, create scripts, drain events; median)"),
        ("whole run", f"{total / sent:10,.0f} jobs/s   (median; best {total / best:,.0f} jobs/s; "
                      f"{total:,} jobs sent in {sent:.2f} s from one process)"),
        ("load average", f"{os.getloadavg()[0]:10.2f}        (other work on this machine slows every number)"),
        ("target", f">= {TARGET:,.0f} jobs/s: {'met' if total / sent >= TARGET else 'NOT met'} (median)"),
    ]
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name.ljust(width)}  {value}" for name, value in rows))


if __name__ == "__main__":
    main()
