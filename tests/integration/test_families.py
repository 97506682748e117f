"""Every model family through real workers: SDXL (base and refiner), SD3 and Flux beside SD 1.x.

Each job's PNG equals a direct call of the family's own diffusers img2img pipeline on the same tiny model,
parameters and seed; a family-specific field changes the output; batched jobs stay within one uint8 step
of their single runs; a field the model's family does not take is refused at submit, naming the family.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from darkroom.common.errors import InvalidJobError
from darkroom.common.families import Family, img2img_class
from darkroom.common.settings import Settings
from darkroom.dev.process import WorkerProcess
from darkroom.dev.tiny import make_tiny_model
from darkroom.producer.client import Client

from ..helpers import png_bytes, wait_until
from .helpers import spawn_worker
from .test_walking_skeleton import fetch_image

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# model id -> (tiny family, the family it runs as, family-specific fields of its test job)
MODELS: dict[str, tuple[str, Family, dict[str, Any]]] = {
    "xl": ("sdxl", Family.SDXL, {"prompt_2": "blue stripes", "original_size": (128, 128),
                                 "crops_coords_top_left": (4, 8), "negative_prompt_2": "green"}),
    "xl-refiner": ("sdxl-refiner", Family.SDXL, {"aesthetic_score": 7.5, "negative_aesthetic_score": 2.0}),
    "sd3": ("sd3", Family.SD3, {"prompt_3": "a watercolor sea", "max_sequence_length": 32}),
    "flux": ("flux", Family.FLUX, {"prompt_2": "a red sun", "max_sequence_length": 32}),
    "sd2-v": ("sd2-v", Family.SD, {}),  # SD 2.x with v-prediction (DDIM)
}
COMMON = {"strength": 0.7, "num_inference_steps": 6, "guidance_scale": 5.0}


@pytest.fixture(scope="module")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {model: make_tiny_model(root / model, family=tiny) for model, (tiny, _, _) in MODELS.items()}


@pytest.fixture(scope="module")
def family_worker(services: object, settings: Settings, tiny_model: Path,
                  family_models: dict[str, Path]) -> Iterator[WorkerProcess]:
    """One worker serving a tiny model of every family (and SD 1.x), batching up to 4 images."""
    args = ["--model", f"tiny={tiny_model}"]
    for model, folder in family_models.items():
        args += ["--model", f"{model}={folder}"]
    process = spawn_worker(services, settings, f"families-{uuid.uuid4().hex[:6]}", *args, "--no-preload",
                           DARKROOM_BATCH_MAX_IMAGES="4", DARKROOM_BATCH_MAX_WAIT_MS="1500",
                           DARKROOM_SAFETY_CHECKER="none").start(timeout=180)
    try:
        yield process
    finally:
        process.stop()


_direct: dict[str, Any] = {}


def direct_pipeline(folder: Path, family: Family) -> Any:
    """The family's own diffusers img2img pipeline on the model folder, loaded as a diffusers user would."""
    import diffusers

    if str(folder) not in _direct:
        pipe = getattr(diffusers, img2img_class(family)).from_pretrained(str(folder))
        pipe.set_progress_bar_config(disable=True)
        _direct[str(folder)] = pipe
    return _direct[str(folder)]


def direct_call(folder: Path, family: Family, image: Image.Image, seed: int, **params: Any) -> np.ndarray:
    import torch

    if family in (Family.SD3, Family.FLUX):
        params = {"width": image.width, "height": image.height, **params}
    out = direct_pipeline(folder, family)(image=image, generator=torch.Generator("cpu").manual_seed(seed), **params)
    return np.asarray(out.images[0])


def upload(client: Client, seed: int) -> tuple[str, Image.Image]:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    return client.upload(png_bytes(image), f"s3://darkroom/inputs/{uuid.uuid4().hex}.png"), image


def job_params(model: str) -> dict[str, Any]:
    _, family, extra = MODELS.get(model, ("sd", Family.SD, {}))
    params: dict[str, Any] = {**COMMON, "prompt": "a red cat", **extra}
    if family is not Family.FLUX:  # Flux is guidance-distilled: no negative prompt
        params["negative_prompt"] = "blurry"
    return params


@pytest.mark.parametrize("model", sorted(MODELS))
def test_a_family_job_equals_its_diffusers_pipeline_pixel_for_pixel(
    client: Client, family_worker: WorkerProcess, family_models: dict[str, Path], model: str,
) -> None:
    # Given a job for a tiny model of the family, with the family's own fields set
    _, family, _ = MODELS[model]
    uri, image = upload(client, 1)
    params = job_params(model)
    # When a worker runs it
    result = client.submit({"model": model, "image": uri, "seed": 11, **params}).wait(timeout=300)
    # Then the output equals the family's diffusers pipeline called directly with the same values
    expected = direct_call(family_models[model], family, image, 11, **params)
    assert np.array_equal(fetch_image(client, result.uris[0]), expected)


@pytest.mark.parametrize(("model", "field", "value"), [
    ("xl", "prompt_2", "yellow sky"), ("xl", "original_size", (512, 512)), ("xl-refiner", "aesthetic_score", 1.0),
    ("sd3", "prompt_3", "a dog"), ("flux", "prompt_2", "green sea"),
])
def test_a_family_specific_field_changes_the_output(
    client: Client, family_worker: WorkerProcess, model: str, field: str, value: Any,
) -> None:
    uri, _ = upload(client, 2)
    base = {"model": model, "image": uri, "seed": 5, **job_params(model)}
    first, second = (client.submit(job).wait(timeout=300) for job in (base, {**base, field: value}))
    assert not np.array_equal(fetch_image(client, first.uris[0]), fetch_image(client, second.uris[0]))


@pytest.mark.parametrize("model", ["xl", "sd3", "flux"])
def test_batched_family_jobs_stay_within_one_step_of_their_single_runs(
    client: Client, family_worker: WorkerProcess, family_models: dict[str, Path], model: str,
) -> None:
    # Given three compatible jobs with their own images, prompts and seeds
    _, family, _ = MODELS[model]
    inputs = [upload(client, 10 + i) for i in range(3)]
    params = job_params(model)
    jobs = [{"model": model, "image": uri, "seed": 30 + i, **params, "prompt": f"variant {i}"}
            for i, (uri, _) in enumerate(inputs)]
    # When they are submitted together
    results = [h.wait(timeout=300) for h in client.submit_many(jobs)]
    # Then they shared a call, and each equals its job run alone within one uint8 step
    assert max(r.parameters["batch"]["jobs"] for r in results) > 1
    for job, (_, image), result in zip(jobs, inputs, results, strict=True):
        single = {k: v for k, v in job.items() if k not in ("model", "image", "seed")}
        expected = direct_call(family_models[model], family, image, job["seed"], **single)
        produced = fetch_image(client, result.uris[0])
        assert np.abs(produced.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize(("model", "field", "value"), [
    ("flux", "negative_prompt", "blurry"), ("flux", "original_size", (64, 64)), ("sd3", "aesthetic_score", 5.0),
    ("tiny", "prompt_2", "x"), ("xl", "prompt_3", "x"), ("xl", "clip_skip", 1),
])
def test_a_field_the_family_does_not_take_is_refused_at_submit(
    client: Client, family_worker: WorkerProcess, model: str, field: str, value: Any,
) -> None:
    family = {**{m: f for m, (_, f, _) in MODELS.items()}, "tiny": Family.SD}[model]
    with pytest.raises(InvalidJobError) as refused:
        client.submit({"model": model, "image": "s3://darkroom/inputs/x.png", "prompt": "p", field: value})
    message = str(refused.value)
    assert field in message and f"is a {family.value} model" in message


def test_the_catalog_knows_each_models_family(client: Client, family_worker: WorkerProcess) -> None:
    catalog = client.fleet.catalog()
    assert {m: catalog[m] for m in [*MODELS, "tiny"]} == {
        "xl": Family.SDXL, "xl-refiner": Family.SDXL, "sd3": Family.SD3, "flux": Family.FLUX, "sd2-v": Family.SD,
        "tiny": Family.SD}


def test_models_of_every_family_share_one_memory_budget(
    client: Client, services: object, settings: Settings, tiny_model: Path, family_models: dict[str, Path],
) -> None:
    # Given a worker whose budget holds the SD model alone, SDXL with Flux, or SD3 with Flux (not SDXL with SD3),
    # serving them under ids of its own (no other worker takes their jobs)
    tag = uuid.uuid4().hex[:6]
    ids = {model: f"{model}-b{tag}" for model in ("tiny", "xl", "sd3", "flux")}
    args = ["--model", f"{ids['tiny']}={tiny_model}"]
    for model in ("xl", "sd3", "flux"):
        args += ["--model", f"{ids[model]}={family_models[model]}"]
    worker = spawn_worker(services, settings, f"budget-{uuid.uuid4().hex[:6]}", *args, "--no-preload",
                          DARKROOM_MODEL_MEMORY_BUDGET_BYTES="8500000", DARKROOM_SAFETY_CHECKER="none",
                          DARKROOM_BATCH_MAX_WAIT_MS="0").start(timeout=180)
    try:
        uri, _ = upload(client, 3)

        def announced(model_id: str) -> Any:
            """The worker's report once it announces ``model_id`` resident: the heartbeat thread announces a
            change of resident models on its own, so a job can end before its load is announced."""
            (report,) = [w.report for w in client.fleet.workers(fresh=True) if w.name == worker.name]
            return report if model_id in report.resident_models else None

        # When jobs of every family arrive interleaved, one at a time
        for model in ("xl", "sd3", "flux", "xl", "tiny", "flux"):
            job = {"model": ids[model], "image": uri, "seed": 1, **job_params(model)}
            assert client.submit(job).wait(timeout=300).worker == worker.name
            # Then after each, its model is resident and the resident weights stay within the budget
            report = wait_until(lambda m=ids[model]: announced(m), 60, f"{ids[model]} announced resident")
            assert 0 < report.resident_bytes <= report.memory_budget == 8_500_000
        # And models of other families were evicted to make room
        (report,) = [w.report for w in client.fleet.workers(fresh=True) if w.name == worker.name]
        assert report.cache.evictions >= 3
    finally:
        worker.stop()


@pytest.fixture(scope="module")
def family_loras(family_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Two random LoRAs per family model (the denoiser's attention layers), as local files."""
    from darkroom.dev.tiny import make_tiny_lora

    root = tmp_path_factory.mktemp("family-loras")
    return {model: [make_tiny_lora(family_models[model], root / f"{model}-{i}.safetensors", seed=i) for i in (1, 2)]
            for model in ("xl", "sd3", "flux")}


def direct_with_lora(folder: Path, family: Family, lora: Path, weight: float, image: Image.Image, seed: int,
                     **params: Any) -> np.ndarray:
    pipe = direct_pipeline(folder, family)
    pipe.load_lora_weights(str(lora), adapter_name="direct")
    pipe.set_adapters(["direct"], [weight])
    try:
        return direct_call(folder, family, image, seed, **params)
    finally:
        pipe.delete_adapters("direct")


@pytest.mark.parametrize("model", ["xl", "sd3", "flux"])
def test_loras_on_every_family_equal_diffusers_and_run_one_call_per_set(
    client: Client, services: object, settings: Settings, family_models: dict[str, Path],
    family_loras: dict[str, list[Path]], model: str,
) -> None:
    # Given a worker that may read the LoRA files (local adapters by id) and batches
    _, family, _ = MODELS[model]
    tag = uuid.uuid4().hex[:6]
    served = f"{model}-l{tag}"  # an id of this worker's own: no other worker takes these jobs
    ids = [f"{model}-lora-{i}" for i in (1, 2)]
    registry = settings.state_dir / f"registry-{model}-{tag}.toml"
    registry.write_text(f'[models.{served}]\nsource = "{family_models[model]}"\n' + "".join(
        f'[adapters.{i}]\nsource = "{p}"\n' for i, p in zip(ids, family_loras[model], strict=True)))
    worker = spawn_worker(services, settings, f"lora-{model}-{uuid.uuid4().hex[:6]}", "--models-file",
                          str(registry), "--no-preload", DARKROOM_BATCH_MAX_IMAGES="4",
                          DARKROOM_BATCH_MAX_WAIT_MS="1500", DARKROOM_SAFETY_CHECKER="none").start(timeout=180)
    try:
        uri, image = upload(client, 4)
        params = job_params(model)
        jobs = [{"model": served, "image": uri, "seed": 9, **params, "adapters": [{"uri": ids[0], "weight": 0.8}]},
                {"model": served, "image": uri, "seed": 9, **params, "adapters": [{"uri": ids[1], "weight": 1.0}]}]
        # When two jobs with different LoRAs arrive together
        first, second = (h.wait(timeout=300) for h in client.submit_many(jobs))
        # Then each equals diffusers with that LoRA loaded and set at the job's weight
        for result, lora, weight in ((first, family_loras[model][0], 0.8), (second, family_loras[model][1], 1.0)):
            expected = direct_with_lora(family_models[model], family, lora, weight, image, 9, **params)
            assert np.array_equal(fetch_image(client, result.uris[0]), expected)
        # And they ran as separate calls (one job each), the result saying why
        for result in (first, second):
            assert result.parameters["adapter_routing"] == "single"
            assert f"{family.value} models run one call per adapter set" in result.parameters["adapter_routing_reason"]
        assert not np.array_equal(fetch_image(client, first.uris[0]), fetch_image(client, second.uris[0]))
    finally:
        worker.stop()


# -- chains ----------------------------------------------------------------------------------------------
def test_an_sdxl_base_then_refiner_chain_runs_the_refiner_on_the_base_output(
    client: Client, family_worker: WorkerProcess, family_models: dict[str, Path],
) -> None:
    # Given a chain: the SDXL base on an input, then the refiner on the base's output
    uri, image = upload(client, 6)
    base = {"model": "xl", "image": uri, "seed": 3, **job_params("xl")}
    refine = {"model": "xl-refiner", "seed": 4, **job_params("xl-refiner"), "strength": 0.3}
    first, second = client.submit_chain([base, refine])
    # When both end
    base_result, refined = first.wait(timeout=300), second.wait(timeout=300)
    # Then the refiner's record names its upstream and its output equals the refiner run on the base's image
    record = client.status(second.job_id)
    assert record.job is not None and record.job.upstream is not None and record.job.upstream.job == first.job_id
    base_image = Image.fromarray(fetch_image(client, base_result.uris[0]))
    params = {k: v for k, v in refine.items() if k not in ("model", "seed")}
    expected = direct_call(family_models["xl-refiner"], Family.SDXL, base_image, 4, **params)
    assert np.array_equal(fetch_image(client, refined.uris[0]), expected)
    assert refined.parameters.get("image", base_result.uris[0]) == base_result.uris[0]


def test_a_chained_job_waits_for_its_upstream_and_fails_or_is_cancelled_with_it(
    client: Client, family_worker: WorkerProcess,
) -> None:
    from darkroom.common.errors import JobCancelled, JobFailed

    # Given an upstream job that fails (its input does not exist) and one chained to it
    failing = {"model": "tiny", "image": f"s3://darkroom/inputs/missing-{uuid.uuid4().hex}.png", "prompt": "x",
               "num_inference_steps": 4}
    first, second = client.submit_chain([failing, {"model": "tiny", "prompt": "y", "num_inference_steps": 4}])
    with pytest.raises(JobFailed):
        first.wait(timeout=300)
    # Then the chained one fails upstream_failed, naming the upstream
    with pytest.raises(JobFailed) as failed:
        second.wait(timeout=300)
    assert failed.value.code == "upstream_failed" and first.job_id in failed.value.message
    # Given an upstream that never runs (a model no worker serves... here: cancelled while queued)
    idle = f"idle{uuid.uuid4().hex[:6]}"
    client.fleet.register_models([idle])
    uri, _ = upload(client, 7)
    up, down = client.submit_chain([{"model": idle, "image": uri, "prompt": "x"},
                                    {"model": "tiny", "prompt": "y", "num_inference_steps": 4}])
    # Then the chained job stays queued, its history saying what it waits for
    wait_until(lambda: any(e.get("event") == "waiting_upstream" for e in client.jobs.history(down.job_id)),
               timeout=120, what="a waiting_upstream note")
    assert client.status(down.job_id).status.value == "queued"
    # And cancelling the upstream cancels it too
    client.cancel(up.job_id)
    with pytest.raises(JobCancelled):
        down.wait(timeout=120)


def test_a_chain_ref_is_validated_at_submit(client: Client, family_worker: WorkerProcess) -> None:
    with pytest.raises(InvalidJobError) as refused:
        client.submit({"model": "tiny", "prompt": "p", "image": {"job": "bad id!", "index": 0}})
    assert "image" in str(refused.value)
    with pytest.raises(InvalidJobError):
        client.submit({"model": "tiny", "prompt": "p", "image": {"job": "abc", "index": 99}})


def test_an_sdxl_ensemble_hands_latents_from_base_to_refiner_as_diffusers_does(
    client: Client, family_worker: WorkerProcess, family_models: dict[str, Path],
) -> None:
    """diffusers' "ensemble of expert denoisers": the base denoises to denoising_end and hands its latents to
    the refiner, which goes on from denoising_start; here through object storage, as two chained jobs."""
    import torch

    # Given a base job that stops at 0.75 and stores its latents, and a refiner job that takes them
    uri, image = upload(client, 8)
    common = {"prompt": "a red cat", "negative_prompt": "blurry", "num_inference_steps": 8, "guidance_scale": 5.0}
    base = {"model": "xl", "image": uri, "seed": 21, "strength": 0.9, "denoising_end": 0.75, "output_latents": True,
            **common}
    first = client.submit(base)
    refine = {"model": "xl-refiner", "seed": 22, "denoising_start": 0.75,
              "image": {"job": first.job_id, "index": 0, "latents": True}, **common}
    second = client.submit(refine)
    first.wait(timeout=300)
    refined = second.wait(timeout=300)
    # Then the refiner's output equals diffusers' own two-pipeline ensemble on the same models and seeds
    latents = direct_pipeline(family_models["xl"], Family.SDXL)(
        image=image, strength=0.9, denoising_end=0.75, output_type="latent",
        generator=torch.Generator("cpu").manual_seed(21), **common).images
    expected = direct_pipeline(family_models["xl-refiner"], Family.SDXL)(
        image=latents, denoising_start=0.75, generator=torch.Generator("cpu").manual_seed(22), **common).images[0]
    produced = fetch_image(client, refined.uris[0])
    assert np.abs(produced.astype(int) - np.asarray(expected).astype(int)).max() <= 1


def test_handing_over_latents_needs_an_upstream_that_stored_them(
    client: Client, family_worker: WorkerProcess,
) -> None:
    from darkroom.common.errors import JobFailed

    uri, _ = upload(client, 9)
    first = client.submit({"model": "xl", "image": uri, "seed": 1, **job_params("xl")})
    second = client.submit({"model": "xl-refiner", "prompt": "p", "denoising_start": 0.5,
                            "image": {"job": first.job_id, "index": 0, "latents": True}})
    with pytest.raises(JobFailed) as failed:
        second.wait(timeout=300)
    assert failed.value.code == "upstream_failed" and "output_latents" in failed.value.message


def test_one_worker_runs_an_interleaved_mix_of_families_with_loras(
    client: Client, family_worker: WorkerProcess, family_loras: dict[str, list[Path]], tiny_model: Path,
    tmp_path: Path,
) -> None:
    from darkroom.dev.tiny import make_tiny_lora

    # Given LoRAs for every family in object storage (jobs name them by s3:// URI)
    files = {model: paths[0] for model, paths in family_loras.items()}
    files["tiny"] = make_tiny_lora(tiny_model, tmp_path / "tiny-lora.safetensors", seed=5)
    uris = {model: client.upload(path, f"s3://darkroom/loras/{uuid.uuid4().hex}.safetensors")
            for model, path in files.items()}
    uri, _ = upload(client, 12)
    # When jobs of every family, with and without their LoRA, arrive interleaved at one worker
    jobs = [{"model": model, "image": uri, "seed": 2, **job_params(model),
             **({"adapters": [{"uri": uris[model], "weight": 0.9}]} if with_lora else {})}
            for with_lora in (True, False) for model in ("xl", "sd3", "flux", "tiny")]
    results = [h.wait(timeout=300) for h in client.submit_many(jobs)]
    # Then each ran with its own adapters (recorded), and a LoRA changed its family's output
    for job, result in zip(jobs, results, strict=True):
        assert len(result.parameters["adapters_resolved"]) == len(job.get("adapters", []))
    for i in range(4):
        assert not np.array_equal(fetch_image(client, results[i].uris[0]), fetch_image(client, results[i + 4].uris[0]))
    (report,) = [w.report for w in client.fleet.workers(fresh=True) if w.name == family_worker.name]
    assert report.resident_bytes <= report.memory_budget
    # every model that ran reports its load and per-image seconds (what idle workers weigh before helping)
    ran = [m for m in ("xl", "sd3", "flux", "tiny") if m in report.resident_models]
    deadline = time.monotonic() + 30  # the report is announced by the heartbeat thread
    while not all(report.model_times.get(m) and report.model_times[m].image_seconds for m in ran):
        assert time.monotonic() < deadline, f"no per-image seconds in {report.model_times}"
        time.sleep(0.5)
        (report,) = [w.report for w in client.fleet.workers(fresh=True) if w.name == family_worker.name]
    assert ran and all(report.model_times[m].load_seconds > 0 for m in ran)
