"""LoRA hot-swap benchmark (issue 3): switching among resident adapters vs a job vs loading from disk.

    .venv/bin/python bench/lora_swap.py [--adapters 10] [--switches 1000] [--size 64]

Everything is measured side by side in this one run on the tiny random-weight model, and printed as
ratios: resident switch / one job, resident switch / load from disk, RSS growth over the switches.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (quiets libraries before they load)
from _common import median_seconds, rss_bytes, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=10)
    parser.add_argument("--switches", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    import torch

    from darkroom.dev.demo import sample_image
    from darkroom.dev.tiny import make_tiny_lora, make_tiny_model
    from darkroom.worker.adapters import AdapterFile, AdapterManager
    from darkroom.worker.device import DeviceInfo
    from darkroom.worker.pipelines import load_pipeline

    cpu = DeviceInfo("cpu", "float32", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_tiny_model(root / "tiny")
        print(f"building {args.adapters} LoRAs (every third also on the text encoder)...", file=sys.stderr)
        files = [AdapterFile.inspect(make_tiny_lora(model, root / f"lora{i}.safetensors", seed=i,
                                                    text_encoder=i % 3 == 0)) for i in range(args.adapters)]
        pipe = load_pipeline(model, cpu, "float32")
        image = sample_image(args.size)

        def job() -> None:
            pipe(prompt="a boat", image=image, strength=0.75, num_inference_steps=args.steps, guidance_scale=7.5,
                 generator=torch.Generator("cpu").manual_seed(0))

        manager = AdapterManager(pipe, max_slots=args.adapters)
        for f in files:
            manager.activate([(f, 1.0)])
        job_s = median_seconds(job, repeat=5)

        rng = random.Random(0)
        order = [rng.randrange(len(files)) for _ in range(args.switches)]
        for i in order[:50]:  # warm-up
            manager.activate([(files[i], 0.8)])
        gc.collect()
        rss_before = rss_bytes()
        samples = []
        for i in order:
            started = time.perf_counter()
            manager.activate([(files[i], 0.8)])
            samples.append(time.perf_counter() - started)
        gc.collect()
        rss_after = rss_bytes()
        switch_s = statistics.median(samples)
        assert manager.loads == len(files), "a switch among resident adapters loaded something"

        fresh = load_pipeline(model, cpu, "float32")

        def load_from_disk(f: AdapterFile = files[1]) -> None:
            fresh.load_lora_weights(str(f.path), adapter_name="probe")
            fresh.delete_adapters(["probe"])

        load_s = median_seconds(load_from_disk, repeat=10)

        small = AdapterManager(load_pipeline(model, cpu, "float32"), max_slots=3)
        churn_rss0, churn_samples = None, []
        for n, i in enumerate(order[:300]):
            started = time.perf_counter()
            small.activate([(files[i], 1.0)])
            churn_samples.append(time.perf_counter() - started)
            if n == 49:
                gc.collect()
                churn_rss0 = rss_bytes()
        gc.collect()
        churn_growth = (rss_bytes() - (churn_rss0 or 0)) / (churn_rss0 or 1)

    print(table([
        ("model", f"tiny random SD ({args.size}x{args.size}, {args.steps} steps, strength 0.75)"),
        ("one job", f"{job_s * 1000:.1f} ms"),
        ("resident switch (median)", f"{switch_s * 1000:.3f} ms over {args.switches} switches, {args.adapters} adapters"),
        ("load from disk + delete", f"{load_s * 1000:.1f} ms"),
        ("switch / job", f"{switch_s / job_s:.4%}   (target <= 1%)"),
        ("switch / load from disk", f"{switch_s / load_s:.4f}"),
        ("RSS growth over switches", f"{(rss_after - rss_before) / rss_before:.3%}   (target <= 2%; "
                                     f"{rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB)"),
        ("3 slots, 300 switches", f"median {statistics.median(churn_samples) * 1000:.1f} ms (loads {small.loads}, "
                                  f"hot-swaps {small.hotswaps}); RSS growth after warm-up {churn_growth:.2%}"),
    ]))


if __name__ == "__main__":
    main()
