"""Per-job pipeline features through a real worker, each against a direct diffusers call:
prompt embeddings, textual inversion, FreeU, output latents and the guidance-scale embedding.
None of them may leak into the next job."""

from __future__ import annotations

import io
import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from darkroom.common.settings import Settings
from darkroom.dev.process import WorkerProcess
from darkroom.producer import Client, JobFailed

from .conftest import plain_pipeline, start_worker
from .test_walking_skeleton import fetch_image, upload_input

pytestmark = pytest.mark.integration

PARAMS: dict[str, Any] = {"strength": 0.75, "num_inference_steps": 4, "guidance_scale": 6.0, "seed": 21}


def guidance_embedding_model(tiny_model: Path, folder: Path) -> Path:
    """The tiny model with a UNet that takes a guidance-scale embedding (time_cond_proj_dim), like LCM UNets."""
    import torch
    from diffusers import UNet2DConditionModel

    target = folder / "tiny-gcond"
    shutil.copytree(tiny_model, target)
    config = json.loads((tiny_model / "unet" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    torch.manual_seed(5)
    unet = UNet2DConditionModel(**{**config, "time_cond_proj_dim": 32})
    shutil.rmtree(target / "unet")
    unet.save_pretrained(str(target / "unet"), safe_serialization=True)
    return target


@pytest.fixture(scope="module")
def gcond_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return guidance_embedding_model(tiny_model, tmp_path_factory.mktemp("gcond"))


@pytest.fixture(scope="module")
def features_worker(services: object, settings: Settings, tiny_model: Path, gcond_model: Path
                    ) -> Iterator[WorkerProcess]:
    process = start_worker(services, settings, tiny_model, "--model", f"gcond={gcond_model}")
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def direct(tiny_model: Path) -> Any:
    return plain_pipeline(tiny_model)


def call(pipe: Any, image: Image.Image, **kwargs: Any) -> Any:
    import torch

    params = {**PARAMS, **kwargs}
    seed = params.pop("seed")
    return pipe(image=[image], generator=[torch.Generator("cpu").manual_seed(seed)], num_images_per_prompt=1,
                **params).images[0]


def run(client: Client, job: dict[str, Any], model: str = "tiny") -> Any:
    return client.submit({"model": model, **PARAMS, **job}).wait(timeout=300)


def upload_safetensors(client: Client, tensors: dict[str, Any]) -> str:
    from safetensors.torch import save

    return client.upload(save(tensors), f"s3://darkroom/embeddings/{uuid.uuid4().hex}.safetensors")


def test_freeu_matches_diffusers_and_does_not_leak(client: Client, features_worker: WorkerProcess,
                                                   direct: Any) -> None:
    uri, image = upload_input(client)
    freeu = {"s1": 0.9, "s2": 0.2, "b1": 1.5, "b2": 1.6}
    with_freeu = fetch_image(client, run(client, {"image": uri, "prompt": "a harbour", "freeu": freeu}).uris[0])
    after = fetch_image(client, run(client, {"image": uri, "prompt": "a harbour"}).uris[0])
    direct.enable_freeu(**freeu)
    try:
        expected = np.asarray(call(direct, image, prompt="a harbour"))
    finally:
        direct.disable_freeu()
    base = np.asarray(call(direct, image, prompt="a harbour"))
    assert np.array_equal(with_freeu, expected)
    assert np.array_equal(after, base)  # the next job is the base model again
    assert not np.array_equal(expected, base)


def test_textual_inversion_matches_diffusers_and_does_not_leak(client: Client, features_worker: WorkerProcess,
                                                               direct: Any, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    uri, image = upload_input(client)
    torch.manual_seed(3)
    vector = {"emb_params": torch.randn(1, 32)}
    ti_uri = upload_safetensors(client, vector)
    save_file(vector, tmp_path / "ti.safetensors")
    prompt = "a <toy-robot> on a beach"
    job = {"image": uri, "prompt": prompt, "textual_inversions": [{"uri": ti_uri, "token": "<toy-robot>"}]}
    with_ti = run(client, job)
    after = fetch_image(client, run(client, {"image": uri, "prompt": prompt}).uris[0])
    direct.load_textual_inversion(str(tmp_path / "ti.safetensors"), token="<toy-robot>")
    try:
        expected = np.asarray(call(direct, image, prompt=prompt))
    finally:
        direct.unload_textual_inversion("<toy-robot>")
    base = np.asarray(call(direct, image, prompt=prompt))
    assert np.array_equal(fetch_image(client, with_ti.uris[0]), expected)
    assert np.array_equal(after, base)  # the token means nothing to the next job
    assert not np.array_equal(expected, base)
    assert with_ti.parameters["textual_inversions_resolved"][0]["token"] == "<toy-robot>"


def test_prompt_embeddings_match_diffusers_and_the_same_prompt_as_text(client: Client, features_worker: WorkerProcess,
                                                                        direct: Any) -> None:
    import torch

    uri, image = upload_input(client)
    with torch.no_grad():
        positive, negative = direct.encode_prompt("a red barn", "cpu", 1, True, "fog")
    embeds_uri = upload_safetensors(client, {"prompt_embeds": positive.contiguous()})
    negative_uri = upload_safetensors(client, {"negative_prompt_embeds": negative.contiguous()})
    result = run(client, {"image": uri, "prompt_embeds": embeds_uri, "negative_prompt_embeds": negative_uri})
    as_text = run(client, {"image": uri, "prompt": "a red barn", "negative_prompt": "fog"})
    expected = np.asarray(call(direct, image, prompt_embeds=positive, negative_prompt_embeds=negative))
    produced = fetch_image(client, result.uris[0])
    assert np.array_equal(produced, expected)
    assert np.array_equal(produced, fetch_image(client, as_text.uris[0]))


def test_embeddings_of_the_wrong_width_fail_the_job_with_a_code(client: Client, features_worker: WorkerProcess) -> None:
    import torch

    uri, _ = upload_input(client)
    wrong = upload_safetensors(client, {"prompt_embeds": torch.zeros(1, 77, 48)})
    with pytest.raises(JobFailed) as failure:
        run(client, {"image": uri, "prompt_embeds": wrong})
    assert failure.value.code == "embedding_invalid"
    assert "48" in failure.value.message


def test_output_latents_match_diffusers_latents(client: Client, features_worker: WorkerProcess, direct: Any) -> None:
    import torch
    from safetensors.torch import load

    uri, image = upload_input(client)
    result = run(client, {"image": uri, "prompt": "a kite", "output_latents": True, "num_images_per_prompt": 2,
                          "seed": [5, 6]})
    output = result.outputs[1]
    assert output.latents_uri is not None and output.latents_uri.endswith("001.latents.safetensors")
    latents = load(client.download(output.latents_uri))["latents"]

    def both(output_type: str) -> Any:  # diffusers' call for the job's two images, one generator each
        return direct(prompt=["a kite"] * 2, image=[image] * 2, output_type=output_type, num_images_per_prompt=1,
                      generator=[torch.Generator("cpu").manual_seed(s) for s in (5, 6)],
                      **{k: v for k, v in PARAMS.items() if k != "seed"}).images

    expected = both("latent")[1:2]
    assert latents.shape == expected.shape == (1, 4, 8, 8)
    assert torch.allclose(latents, expected.float(), atol=1e-6)
    # and the image beside them is diffusers' own PNG
    assert np.array_equal(fetch_image(client, output.uri or ""), np.asarray(both("pil")[1]))
    assert Image.open(io.BytesIO(client.download(output.uri or ""))).size == (64, 64)


def test_guidance_scale_embedding_matches_diffusers(client: Client, features_worker: WorkerProcess,
                                                    gcond_model: Path) -> None:
    uri, image = upload_input(client)
    result = run(client, {"image": uri, "prompt": "a bridge", "guidance_scale": 4.0}, model="gcond")
    tiny = run(client, {"image": uri, "prompt": "a bridge"})
    # the record names each model by the content of its files
    assert len(result.parameters["model_sha256"]) == 64
    assert result.parameters["model_sha256"] != tiny.parameters["model_sha256"]
    pipe = plain_pipeline(gcond_model)
    assert pipe.unet.config.time_cond_proj_dim == 32  # the pipeline feeds it w = guidance_scale - 1
    expected = np.asarray(call(pipe, image, prompt="a bridge", guidance_scale=4.0))
    other = np.asarray(call(pipe, image, prompt="a bridge", guidance_scale=5.0))
    assert np.array_equal(fetch_image(client, result.uris[0]), expected)
    assert not np.array_equal(expected, other)
