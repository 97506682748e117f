"""IP-Adapter through a real worker (registry file, Redis, S3): a job with an image prompt equals diffusers'
own ``load_ip_adapter`` + ``set_ip_adapter_scale`` call pixel for pixel, the next job without one is the base
model again, and jobs that cannot have an image prompt are refused with a code that says why."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from darkroom.common.errors import InvalidJobError
from darkroom.common.settings import Settings
from darkroom.dev.process import WorkerProcess
from darkroom.dev.tiny import IP_ADAPTER_ENCODER, make_tiny_ip_adapter
from darkroom.producer import Client, JobFailed
from darkroom.worker.filecache import push_files

from ..conftest import png_bytes
from .conftest import plain_pipeline, spawn_worker
from .test_walking_skeleton import fetch_image, upload_input

pytestmark = pytest.mark.integration

PARAMS: dict[str, Any] = {"strength": 0.75, "num_inference_steps": 4, "guidance_scale": 6.0, "seed": 33,
                          "prompt": "a lighthouse at dusk"}
REGISTRY_SCALE = 0.5


@pytest.fixture(scope="module")
def ip_files(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_tiny_ip_adapter(tmp_path_factory.mktemp("ip-adapter"), tiny_model)


@pytest.fixture(scope="module")
def ip_worker(services: object, settings: Settings, tiny_model: Path, ip_files: tuple[Path, Path],
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """A worker serving the tiny model with its IP-Adapter as ``tiny-ip`` (local files) and ``tiny-ip-s3`` (the
    same files from S3), and without one as ``plain``."""
    weights, encoder = ip_files
    prefix = f"s3://darkroom/models/ip-{uuid.uuid4().hex[:8]}"
    with Client(settings) as client:
        push_files(client.store, weights, prefix)
        push_files(client.store, encoder, f"{prefix}/{IP_ADAPTER_ENCODER}")
    registry = tmp_path_factory.mktemp("ip-registry") / "models.toml"
    registry.write_text(
        f'[models.tiny-ip]\nsource = "{tiny_model}"\n'
        f'ip_adapter = {{ weights = "{weights}", image_encoder = "{encoder}", scale = {REGISTRY_SCALE} }}\n\n'
        f'[models.tiny-ip-s3]\nsource = "{tiny_model}"\n'
        f'ip_adapter = {{ weights = "{prefix}/{weights.name}", image_encoder = "{prefix}/{IP_ADAPTER_ENCODER}/" }}\n\n'
        f'[models.plain]\nsource = "{tiny_model}"\n')
    process = spawn_worker(services, settings, f"ip-{uuid.uuid4().hex[:8]}", "--models-file", str(registry))
    process.start(timeout=120)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def direct(tiny_model: Path, ip_files: tuple[Path, Path]) -> Any:
    """Plain diffusers with the same IP-Adapter, loaded by diffusers itself."""
    pipe = plain_pipeline(tiny_model)
    pipe.load_ip_adapter(str(ip_files[0].parent), subfolder="", weight_name=ip_files[0].name,
                         image_encoder_folder=IP_ADAPTER_ENCODER, local_files_only=True)
    return pipe


def call(pipe: Any, image: Image.Image, **kwargs: Any) -> np.ndarray:
    import torch

    params = {k: v for k, v in PARAMS.items() if k != "seed"}
    out = pipe(image=[image], generator=[torch.Generator("cpu").manual_seed(PARAMS["seed"])], num_images_per_prompt=1,
               **params, **kwargs)
    return np.asarray(out.images[0])


def upload_image_prompt(client: Client) -> tuple[str, Image.Image]:
    rng = np.random.default_rng(9)
    image = Image.fromarray(rng.integers(0, 256, (56, 48, 3), dtype=np.uint8))
    return client.upload(png_bytes(image), f"s3://darkroom/inputs/ip-{uuid.uuid4().hex}.png"), image


def run(client: Client, model: str, **job: Any) -> Any:
    return client.submit({"model": model, **PARAMS, **job}).wait(timeout=300)


def test_image_prompt_jobs_equal_diffusers_and_the_next_job_is_the_base_model(
    client: Client, ip_worker: WorkerProcess, direct: Any, tiny_model: Path
) -> None:
    uri, image = upload_input(client)
    ip_uri, ip_image = upload_image_prompt(client)
    # Given jobs on the IP-Adapter model: the registry's scale (0.5), the job's own scale (1.0), then none
    at_default = run(client, "tiny-ip", image=uri, ip_adapter_image=ip_uri)
    at_one = run(client, "tiny-ip", image=uri, ip_adapter_image=ip_uri, ip_adapter_scale=1.0)
    after = run(client, "tiny-ip", image=uri)
    # Then each equals diffusers' own IP-Adapter call at that scale, pixel for pixel
    for result, scale in ((at_default, REGISTRY_SCALE), (at_one, 1.0)):
        direct.set_ip_adapter_scale(scale)
        expected = call(direct, image, ip_adapter_image=ip_image)
        assert np.array_equal(fetch_image(client, result.uris[0]), expected), scale
        assert result.parameters["ip_adapter_scale"] == scale
        assert result.parameters["ip_adapter_resolved"]["image_encoder"].endswith(IP_ADAPTER_ENCODER)
    # And the job without an image prompt, right after, is the model without any IP-Adapter
    base = call(plain_pipeline(tiny_model), image)
    assert np.array_equal(fetch_image(client, after.uris[0]), base)
    assert not np.array_equal(fetch_image(client, at_one.uris[0]), base)
    assert "ip_adapter_resolved" not in after.parameters


def test_an_ip_adapter_from_s3_gives_the_same_images_as_from_local_files(
    client: Client, ip_worker: WorkerProcess
) -> None:
    uri, _ = upload_input(client)
    ip_uri, _ = upload_image_prompt(client)
    local = run(client, "tiny-ip", image=uri, ip_adapter_image=ip_uri, ip_adapter_scale=0.8)
    remote = run(client, "tiny-ip-s3", image=uri, ip_adapter_image=ip_uri, ip_adapter_scale=0.8)
    assert np.array_equal(fetch_image(client, local.uris[0]), fetch_image(client, remote.uris[0]))


def test_an_image_prompt_for_a_model_without_an_ip_adapter_fails_invalid_job(
    client: Client, ip_worker: WorkerProcess
) -> None:
    uri, _ = upload_input(client)
    ip_uri, _ = upload_image_prompt(client)
    with pytest.raises(JobFailed) as failed:
        run(client, "plain", image=uri, ip_adapter_image=ip_uri)
    assert failed.value.code == "invalid_job"
    assert "model 'plain' has none configured" in failed.value.message
    assert "tiny-ip" in failed.value.message  # the models that have one


def test_a_missing_image_prompt_fails_input_not_found_naming_the_field(client: Client, ip_worker: WorkerProcess
                                                                       ) -> None:
    uri, _ = upload_input(client)
    missing = f"s3://darkroom/inputs/no-such-{uuid.uuid4().hex}.png"
    with pytest.raises(JobFailed) as failed:
        run(client, "tiny-ip", image=uri, ip_adapter_image=missing)
    assert failed.value.code == "input_not_found"
    assert failed.value.message.startswith(f"ip_adapter_image {missing} does not exist")


def test_submit_refuses_an_ip_adapter_scale_without_an_image_prompt(client: Client) -> None:
    with pytest.raises(InvalidJobError) as refused:
        client.submit({"model": "tiny-ip", "image": "s3://darkroom/inputs/x.png", "prompt": "x",
                       "ip_adapter_scale": 0.7})
    [error] = refused.value.errors
    assert (error.field, error.value, error.allowed) == ("ip_adapter_scale", 0.7,
                                                         "ip_adapter_scale only with ip_adapter_image")
    with pytest.raises(InvalidJobError, match=r"ip_adapter_scale=2.5: .*allowed: 0.0 <= ip_adapter_scale <= 2.0"):
        client.submit({"model": "tiny-ip", "image": "s3://darkroom/inputs/x.png", "prompt": "x",
                       "ip_adapter_image": "s3://darkroom/inputs/y.png", "ip_adapter_scale": 2.5})
