"""Record a simulation profile from a real worker: ``darkroom worker --simulate`` then sleeps for it.

    .venv/bin/python bench/record_profile.py --out profile.json [--model ID=SOURCE] [--sizes 64x64,128x128]
                                             [--batches 1,2,4] [--steps 10] [--device cpu]

Starts its own embedded Redis and S3 server and one real worker (the tiny test model unless ``--model`` names
another), submits groups of identical-shape jobs (one group per size and batch size, submitted together so
the engine runs them as one call), and reads what every job's ``result.json`` says the worker did: the call's
``inference`` seconds, the steps it ran and its batch (``parameters.batch.images``), the first job's
``model_load`` and a LoRA job's ``adapters`` seconds. The worker's report gives the model's resident bytes.

Per-step time is the median of ``inference / steps_run`` per (size, images of the call).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

from darkroom.dev.process import WorkerProcess
from darkroom.producer.client import Client


def record(client: Client, model: str, sizes: list[tuple[int, int]], batches: list[int], steps: int,
           lora: str | None, repeat: int) -> dict[str, Any]:
    from darkroom.dev.demo import sample_image

    per_step: dict[tuple[int, int], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    load = 0.0
    for width, height in sizes:
        buffer = io.BytesIO()
        sample_image(max(width, height)).resize((width, height)).save(buffer, format="PNG")
        image = client.upload(buffer.getvalue(), f"s3://darkroom/inputs/{uuid.uuid4().hex}.png")
        warm = client.submit({"model": model, "image": image, "prompt": "warm-up", "strength": 1.0,
                              "num_inference_steps": steps, "resize_mode": "keep"}).wait(timeout=900)
        load = max(load, warm.timings.model_load or 0.0)  # the first call of a shape is not a step time
        for images in batches:
            for _ in range(repeat):
                jobs = [{"model": model, "image": image, "prompt": f"a lighthouse {i}", "strength": 1.0,
                         "num_inference_steps": steps, "resize_mode": "keep"} for i in range(images)]
                for result in (h.wait(timeout=900) for h in client.submit_many(jobs)):
                    load = max(load, result.timings.model_load or 0.0)
                    batch = int(result.parameters.get("batch", {}).get("images", 1))
                    run = max(1, int(result.parameters.get("steps_run") or steps))
                    per_step[(width, height)][batch].append(result.timings.inference / run)
    adapter = 0.0
    if lora is not None:
        buffer = io.BytesIO()
        sample_image(64).save(buffer, format="PNG")
        image = client.upload(buffer.getvalue(), f"s3://darkroom/inputs/{uuid.uuid4().hex}.png")
        result = client.submit({"model": model, "image": image, "prompt": "x", "num_inference_steps": 2,
                                "adapters": [{"uri": lora}]}).wait(timeout=900)
        adapter = result.timings.adapters
    reports = [w.report for w in client.fleet.workers(fresh=True)]
    nbytes = max((r.resident_bytes or 0) for r in reports) if reports else 0
    return {
        "name": f"recorded-{model}",
        "recorded": {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "device": reports[0].device if reports else None,
                     "device_name": reports[0].device_name if reports else None},
        "adapter_load_seconds": round(adapter, 4),
        "default_model": {"bytes": nbytes or 1, "load_seconds": round(load, 3)},
        "models": {model: {"bytes": nbytes or 1, "load_seconds": round(load, 3)}},
        "step_seconds": {f"{w}x{h}": {str(b): round(statistics.median(v), 5) for b, v in sorted(rows.items())}
                         for (w, h), rows in per_step.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=None, metavar="ID=SOURCE", help="default: the tiny test model")
    parser.add_argument("--sizes", default="64x64,128x128")
    parser.add_argument("--batches", default="1,2,4")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    sizes = [(int(s.split("x")[0]), int(s.split("x")[1])) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    from darkroom.common.settings import Settings
    from darkroom.dev.embedded import EmbeddedServices

    with tempfile.TemporaryDirectory(prefix="darkroom-profile-") as tmp:
        folder = Path(tmp)
        lora_file = None
        if args.model is None:
            from darkroom.dev.tiny import make_tiny_lora, make_tiny_model

            model_dir = make_tiny_model(folder / "tiny")
            lora_file = make_tiny_lora(model_dir, folder / "style.safetensors", seed=1)
            args.model = f"tiny={model_dir}"
        model_id = args.model.partition("=")[0]
        services = EmbeddedServices(folder / "services")
        endpoints = services.up(timeout=60)
        try:
            env = {**endpoints.as_env(), "DARKROOM_STATE_DIR": str(folder / "state"), "DARKROOM_METRICS_PORT": "0",
                   "DARKROOM_SAFETY_CHECKER": "none", "DARKROOM_BATCH_MAX_WAIT_MS": "200"}
            settings = Settings(state_dir=folder / "state", redis_url=env["DARKROOM_REDIS_URL"],
                                s3_endpoint_url=env["DARKROOM_S3_ENDPOINT_URL"],
                                s3_access_key_id=env["DARKROOM_S3_ACCESS_KEY_ID"],
                                s3_secret_access_key=env["DARKROOM_S3_SECRET_ACCESS_KEY"],
                                s3_region=env["DARKROOM_S3_REGION"])
            worker = WorkerProcess("profile-worker", ["--model", args.model, "--no-preload", "--device", args.device,
                                                      "--log-level", "warning"],
                                   env=env, redis_url=env["DARKROOM_REDIS_URL"], log_path=folder / "worker.log")
            worker.start(timeout=300)
            try:
                with Client(settings) as client:
                    lora = None
                    if lora_file is not None:
                        lora = client.upload(lora_file.read_bytes(), "s3://darkroom/loras/profile.safetensors")
                    profile = record(client, model_id, sizes, batches, args.steps, lora, args.repeat)
            finally:
                worker.stop()
        finally:
            services.down()
    args.out.write_text(json.dumps(profile, indent=2) + "\n")
    print(json.dumps(profile, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
