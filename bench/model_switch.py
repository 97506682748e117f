"""Resident-model benchmark (issue 3): a resident hit vs a cold load, and memory after evictions.

    .venv/bin/python bench/model_switch.py [--cycles 10]

Side by side in one run on tiny random-weight models: time to get a resident model vs to load one
(after evicting another), whole-job time warm vs cold, and RSS across load/evict cycles (eviction
must give the memory back).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (quiets libraries before they load)
from _common import median_seconds, rss_bytes, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=10, help="cold loads (each evicting the other model)")
    args = parser.parse_args()

    import torch

    from darkroom.dev.demo import sample_image
    from darkroom.dev.tiny import make_tiny_model
    from darkroom.worker.device import DeviceInfo
    from darkroom.worker.filecache import FileCache
    from darkroom.worker.pipelines import PipelineCache, module_bytes_all
    from darkroom.worker.registry import ModelRegistry

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = {"a": make_tiny_model(root / "a", seed=1), "b": make_tiny_model(root / "b", seed=2)}
        registry = ModelRegistry.build(pairs=[f"{k}={v}" for k, v in paths.items()])
        probe = PipelineCache(registry, DeviceInfo("cpu", "float32", "cpu"), FileCache(root / "c0", store=None),  # type: ignore[arg-type]
                              budget_bytes=10**12)
        size = module_bytes_all(probe.get("a").pipeline)
        del probe
        gc.collect()
        cache = PipelineCache(registry, DeviceInfo("cpu", "float32", "cpu"), FileCache(root / "c", store=None),  # type: ignore[arg-type]
                              budget_bytes=int(size * 1.5))  # room for one model: every switch is a cold load
        image = sample_image(64)

        def job(model_id: str) -> None:
            pipe = cache.get(model_id).pipeline
            pipe(prompt="a boat", image=image, strength=0.75, num_inference_steps=20,
                 generator=torch.Generator("cpu").manual_seed(0))

        job("a")
        hit_get = median_seconds(lambda: cache.get("a"), repeat=50)
        warm_job = median_seconds(lambda: job("a"), repeat=5)
        cold_gets, cold_jobs, rss = [], [], []
        for _ in range(args.cycles):
            assert cache.resident == ["a"]
            started = time.perf_counter()
            cache.get("b")  # cold: loads b and evicts a
            cold_gets.append(time.perf_counter() - started)
            started = time.perf_counter()
            job("a")  # a whole job that starts with a cold load (evicting b)
            cold_jobs.append(time.perf_counter() - started)
            gc.collect()
            rss.append(rss_bytes())
        cold_get, cold_job = statistics.median(cold_gets), statistics.median(cold_jobs)

    growth = (rss[-1] - rss[1]) / rss[1]
    print(table([
        ("model size", f"{size / 2**20:.1f} MiB of weights (tiny random SD)"),
        ("resident hit (get)", f"{hit_get * 1e6:.1f} us"),
        ("cold load (get, evicting the other)", f"{cold_get * 1000:.1f} ms"),
        ("resident hit / cold load", f"{hit_get / cold_get:.6f}"),
        ("job warm vs cold", f"{warm_job * 1000:.0f} ms vs {cold_job * 1000:.0f} ms  (cold / warm = {cold_job / warm_job:.2f})"),
        ("evictions", f"{cache.evictions} in {args.cycles} cycles (two cold loads each)"),
        ("RSS over cycles", f"{rss[1] / 2**20:.0f} -> {rss[-1] / 2**20:.0f} MiB ({growth:+.2%}); eviction frees memory "
                            "when this stays flat"),
    ]))


if __name__ == "__main__":
    main()
