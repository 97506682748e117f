"""Mixed-adapter batching through a real worker: jobs with different LoRAs share one call and each gets what it
would get alone; with mixing off they are split by adapter set, and every record says which path it took."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from darkroom.common.errors import ErrorCode
from darkroom.common.settings import Settings
from darkroom.dev.process import WorkerProcess
from darkroom.dev.tiny import make_tiny_lora
from darkroom.producer import Client, JobFailed

from ..conftest import png_bytes
from .conftest import plain_pipeline, spawn_worker
from .test_walking_skeleton import fetch_image

pytestmark = pytest.mark.integration

MODEL = "tiny-mixing"  # served by this module's worker only: the session's worker must not take its jobs
COMMON: dict[str, Any] = {"model": MODEL, "strength": 0.75, "num_inference_steps": 6, "guidance_scale": 6.0}
WORKER_ENV = {"DARKROOM_BATCH_MAX_IMAGES": "8", "DARKROOM_BATCH_MAX_WAIT_MS": "3000",
              "DARKROOM_SAFETY_CHECKER": "none", "DARKROOM_METRICS_PORT": "0"}


@pytest.fixture(scope="module")
def lora_files(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mixed-loras")
    specs: dict[str, dict[str, Any]] = {"unet": {"seed": 21}, "te": {"seed": 22, "unet": False, "text_encoder": True},
                                        "wide": {"seed": 23, "rank": 8, "text_encoder": True},
                                        "dora": {"seed": 24, "dora": True}}
    return {name: make_tiny_lora(tiny_model, root / f"{name}.safetensors", **kw) for name, kw in specs.items()}


@pytest.fixture(scope="module")
def lora_uris(client_module: Client, lora_files: dict[str, Path]) -> dict[str, str]:
    prefix = f"s3://darkroom/loras/{uuid.uuid4().hex}"
    return {name: client_module.upload(path.read_bytes(), f"{prefix}/{name}.safetensors")
            for name, path in lora_files.items()}


@pytest.fixture(scope="module")
def client_module(settings: Settings) -> Iterator[Client]:
    with Client(settings) as c:
        yield c


def worker(services: object, settings: Settings, model: str, tiny_model: Path, **env: str) -> WorkerProcess:
    return spawn_worker(services, settings, f"mix-{uuid.uuid4().hex[:6]}", "--model", f"{model}={tiny_model}",
                        **{**WORKER_ENV, **env}).start(timeout=120)


@pytest.fixture(scope="module")
def mixing_worker(services: object, settings: Settings, tiny_model: Path) -> Iterator[WorkerProcess]:
    process = worker(services, settings, MODEL, tiny_model)  # DARKROOM_MIXED_ADAPTERS is on by default
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def reference(tiny_model: Path, lora_files: dict[str, Path]) -> Any:
    """Plain diffusers with the three LoRAs loaded under their names."""
    pipe = plain_pipeline(tiny_model)
    for name in ("unet", "te", "wide"):
        pipe.load_lora_weights(str(lora_files[name]), adapter_name=name)
    return pipe


def alone(pipe: Any, image: Image.Image, job: dict[str, Any], adapters: list[tuple[str, float]]) -> np.ndarray:
    """The job by itself through diffusers: set_adapters with its weights, or LoRA disabled."""
    import torch

    if adapters:
        pipe.enable_lora()
        pipe.set_adapters([n for n, _ in adapters], adapter_weights=[w for _, w in adapters])
    else:
        pipe.disable_lora()
    out = pipe(prompt=[job["prompt"]], image=[image], generator=[torch.Generator("cpu").manual_seed(job["seed"])],
               num_images_per_prompt=1, strength=COMMON["strength"], num_inference_steps=COMMON["num_inference_steps"],
               guidance_scale=COMMON["guidance_scale"])
    return np.asarray(out.images[0]).astype(int)


# none, a UNet LoRA, a text-encoder-only LoRA, a two-adapter blend (ranks 4 and 8, UNet + text encoder) with
# weights other than 1, and the UNet LoRA again at another weight
ADAPTER_SETS: list[list[tuple[str, float]]] = [[], [("unet", 1.0)], [("te", 1.0)], [("unet", 0.6), ("wide", -0.7)],
                                               [("unet", 0.5)]]


def mixed_jobs(client: Client, uris: dict[str, str]) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    rng = np.random.default_rng(11)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in ADAPTER_SETS]
    jobs = []
    for index, (adapters, image) in enumerate(zip(ADAPTER_SETS, images, strict=True)):
        uri = client.upload(png_bytes(image), f"s3://darkroom/inputs/{uuid.uuid4().hex}.png")
        jobs.append({**COMMON, "image": uri, "prompt": f"harbour, variant {index}", "seed": 300 + index,
                     "adapters": [{"uri": uris[name], "weight": weight} for name, weight in adapters]})
    return jobs, images


def test_jobs_with_different_adapters_share_one_call_and_match_their_single_job_outputs(
    client: Client, mixing_worker: WorkerProcess, lora_uris: dict[str, str], reference: Any
) -> None:
    # Given five jobs that differ only in their adapters (none, UNet, text encoder, a blend, another weight)
    jobs, images = mixed_jobs(client, lora_uris)
    # When they are submitted together
    results = [h.wait(timeout=300) for h in client.submit_many(jobs)]
    # Then they ran as one pipeline call, routed per sample, and each record says so
    for result in results:
        assert result.parameters["adapter_routing"] == "mixed"
        assert result.parameters["batch"] == {"jobs": 5, "images": 5, "adapter_sets": 5}
        assert "adapter_routing_reason" not in result.parameters
    assert [[a["weight"] for a in r.parameters["adapters_resolved"]] for r in results] == \
        [[w for _, w in s] for s in ADAPTER_SETS]
    # And each output equals what diffusers makes of the job alone (set_adapters), within one uint8 step
    for index, (job, image, result) in enumerate(zip(jobs, images, results, strict=True)):
        produced = fetch_image(client, result.uris[0]).astype(int)
        expected = alone(reference, image, job, ADAPTER_SETS[index])
        assert np.abs(produced - expected).max() <= 1, f"job {index} ({ADAPTER_SETS[index]})"
        # And differs from the base model's output wherever an adapter is active
        if ADAPTER_SETS[index]:
            assert np.abs(produced - alone(reference, image, job, [])).max() > 8, f"job {index} looks like the base"


def test_a_missing_adapter_fails_only_its_own_job_in_a_mixed_group(
    client: Client, mixing_worker: WorkerProcess, lora_uris: dict[str, str]
) -> None:
    jobs, _ = mixed_jobs(client, lora_uris)
    missing = {**jobs[1], "adapters": [{"uri": f"s3://darkroom/loras/{uuid.uuid4().hex}.safetensors"}]}
    handles = client.submit_many([jobs[0], missing, jobs[2], jobs[3]])
    with pytest.raises(JobFailed) as failure:
        handles[1].wait(timeout=300)
    assert failure.value.code == ErrorCode.ADAPTER_NOT_FOUND
    results = [handles[i].wait(timeout=300) for i in (0, 2, 3)]
    assert {r.parameters["adapter_routing"] for r in results} == {"mixed"}
    assert {r.parameters["batch"]["jobs"] for r in results} == {3}


def test_with_mixing_off_jobs_batch_by_identical_adapter_set_and_say_why(
    client: Client, services: object, settings: Settings, tiny_model: Path, lora_uris: dict[str, str]
) -> None:
    # Given a worker with mixed-adapter batching turned off (serving the model under an id of its own)
    process = worker(services, settings, "tiny-unmixed", tiny_model, DARKROOM_MIXED_ADAPTERS="false")
    try:
        jobs, _ = mixed_jobs(client, lora_uris)
        jobs = [{**job, "model": "tiny-unmixed"} for job in jobs]
        # When two jobs with the UNet LoRA and two without adapters are submitted together
        batch = [jobs[1], {**jobs[1], "seed": 7}, jobs[0], {**jobs[0], "seed": 8}]
        results = [h.wait(timeout=300) for h in client.submit_many(batch)]
    finally:
        process.stop()
    # Then the jobs with the same adapter set shared a call, the two sets ran apart, and the records say so
    assert [r.parameters["adapter_routing"] for r in results] == ["identical"] * 4
    assert [r.parameters["batch"]["jobs"] for r in results] == [2] * 4
    assert all("adapter_routing_reason" not in r.parameters for r in results)  # keyed apart: nothing fell back


def test_dora_jobs_fall_back_to_their_own_call_and_the_others_still_mix(
    client: Client, mixing_worker: WorkerProcess, lora_uris: dict[str, str]
) -> None:
    # Given two DoRA jobs (peft cannot route DoRA per sample) among jobs with other adapters
    jobs, _ = mixed_jobs(client, lora_uris)
    dora = {**jobs[1], "adapters": [{"uri": lora_uris["dora"], "weight": 1.0}]}
    handles = client.submit_many([jobs[0], dora, jobs[1], {**dora, "seed": 9}])
    plain, first_dora, styled, second_dora = (h.wait(timeout=300) for h in handles)
    # Then the DoRA jobs ran in a call of their own, and their records say which path and why
    for result in (first_dora, second_dora):
        assert result.parameters["adapter_routing"] == "identical"
        assert result.parameters["batch"]["jobs"] == 2
        assert "DoRA" in result.parameters["adapter_routing_reason"]
    # And the others still shared one mixed call
    for result in (plain, styled):
        assert result.parameters["adapter_routing"] == "mixed"
        assert result.parameters["batch"]["jobs"] == 2
