"""IP-Adapter in-process: the tiny adapter loads as diffusers loads it, a job with an image prompt equals
diffusers' own call, calls without one are the base model bit for bit, each job of a batch keeps its own
image prompt, and the registry and pipeline settings refuse what cannot work."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from darkroom.common.errors import ConfigurationError, JobError
from darkroom.common.jobs import Img2ImgJob
from darkroom.dev.tiny import IP_ADAPTER_ENCODER, make_tiny_ip_adapter
from darkroom.worker.device import DeviceInfo
from darkroom.worker.features import applied
from darkroom.worker.inference.call import WorkItem, batch_key, run_batch
from darkroom.worker.ip_adapter import IPAdapterFiles, has_ip_adapter, load_ip_adapter
from darkroom.worker.pipelines import load_pipeline
from darkroom.worker.registry import IPAdapterSpec, ModelRegistry
from darkroom.worker.tuning import Attention, Tuning

CPU = DeviceInfo("cpu", "float32", "cpu")
CALL: dict[str, Any] = {"strength": 0.75, "num_inference_steps": 4, "guidance_scale": 6.0}


@pytest.fixture(scope="module")
def ip_files(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> IPAdapterFiles:
    weights, encoder = make_tiny_ip_adapter(tmp_path_factory.mktemp("ip-adapter"), tiny_model)
    return IPAdapterFiles(weights, encoder)


@pytest.fixture(scope="module")
def worker_pipe(tiny_model: Path, ip_files: IPAdapterFiles) -> Any:
    """The tiny model with its IP-Adapter, loaded as a worker loads it."""
    return load_pipeline(tiny_model, CPU, "float32", ip_adapter=ip_files)


@pytest.fixture(scope="module")
def reference(tiny_model: Path, ip_files: IPAdapterFiles) -> Any:
    """Plain diffusers: the same folder, with diffusers' own load_ip_adapter."""
    pipe = plain(tiny_model)
    pipe.load_ip_adapter(str(ip_files.weights.parent), subfolder="", weight_name=ip_files.weights.name,
                         image_encoder_folder=IP_ADAPTER_ENCODER, local_files_only=True)
    return pipe


def plain(tiny_model: Path) -> Any:
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(str(tiny_model), safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def picture(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def item(index: int, ip_image: Image.Image | None = None, scale: float | None = None, **fields: Any) -> WorkItem:
    job = Img2ImgJob(model="tiny", image="s3://inputs/x.png", prompt=f"a lighthouse, take {index}", seed=70 + index,
                     job_id=f"ip-{index}", **{**CALL, **fields})
    return WorkItem(job, picture(index), job.seeds(), ip_adapter_image=ip_image,
                    ip_adapter_scale=None if ip_image is None else (1.0 if scale is None else scale))


def through_worker(pipe: Any, items: list[WorkItem]) -> list[np.ndarray]:
    with applied(pipe, (), None, items[0].ip_adapter_scale):
        output = run_batch(pipe, items)
    return [np.asarray(images[0]).astype(int) for images in output.images]


def direct(pipe: Any, it: WorkItem, **kwargs: Any) -> np.ndarray:
    out = pipe(prompt=it.job.prompts(), image=[it.image], generator=[torch.Generator("cpu").manual_seed(it.seeds[0])],
               num_images_per_prompt=1, **CALL, **kwargs)
    return np.asarray(out.images[0]).astype(int)


def test_the_tiny_ip_adapter_is_deterministic_and_loads_into_the_tiny_pipeline(
    tiny_model: Path, ip_files: IPAdapterFiles, worker_pipe: Any, tmp_path: Path
) -> None:
    # Given the tiny IP-Adapter written twice with the same seed
    again = make_tiny_ip_adapter(tmp_path / "again", tiny_model)
    # Then the files are byte-identical (weights, encoder weights, encoder and processor configs)
    for ours, theirs in ((ip_files.weights, again[0]), *(
            (ip_files.image_encoder / name, again[1] / name)
            for name in ("model.safetensors", "config.json", "preprocessor_config.json"))):
        assert hashlib.sha256(ours.read_bytes()).digest() == hashlib.sha256(theirs.read_bytes()).digest(), ours.name
    # And loaded as a worker loads it, the UNet carries IP layers at rest (scale 0) and the encoder is registered
    assert has_ip_adapter(worker_pipe)
    assert type(worker_pipe.image_encoder).__name__ == "CLIPVisionModelWithProjection"
    scales = {s for p in worker_pipe.unet.attn_processors.values() for s in getattr(p, "scale", []) or []}
    assert scales == {0.0}


def test_a_job_with_an_image_prompt_equals_diffusers_load_ip_adapter_and_set_ip_adapter_scale(
    worker_pipe: Any, reference: Any
) -> None:
    for scale in (1.0, 0.6):
        # Given a job with an image prompt at a scale
        job = item(1, picture(100, (48, 40)), scale)
        # When it runs as the worker runs it, and through diffusers' own IP-Adapter API
        produced = through_worker(worker_pipe, [job])[0]
        reference.set_ip_adapter_scale(scale)
        expected = direct(reference, job, ip_adapter_image=job.ip_adapter_image)
        # Then the images are identical, and the image prompt shows (scale 0 would be the base model)
        assert np.array_equal(produced, expected), scale
        reference.set_ip_adapter_scale(0.0)
        assert np.abs(produced - direct(reference, job, ip_adapter_image=job.ip_adapter_image)).max() > 8


def test_a_call_without_an_image_prompt_is_the_base_model_and_nothing_leaks(
    tiny_model: Path, worker_pipe: Any
) -> None:
    # Given the IP-Adapter model after a job with an image prompt
    through_worker(worker_pipe, [item(2, picture(101))])
    # When a job without one runs (diffusers alone would raise: the IP layers want image embeddings)
    produced = through_worker(worker_pipe, [item(3)])[0]
    # Then it equals the model without any IP-Adapter, pixel for pixel, and the scale is back at rest
    assert np.array_equal(produced, direct(plain(tiny_model), item(3)))
    assert {s for p in worker_pipe.unet.attn_processors.values() for s in getattr(p, "scale", []) or []} == {0.0}


def test_each_job_of_a_batch_keeps_its_own_image_prompt(worker_pipe: Any) -> None:
    # Given four jobs with image prompts: three alike but for their image prompt (A, B, A again), one other job
    a, b = picture(110), picture(111, (40, 56))
    jobs = [item(10, a), item(10, b), item(10, a), item(11, picture(112))]
    assert len({batch_key(j) for j in jobs}) == 1
    # When they run as one call
    batched = through_worker(worker_pipe, jobs)
    # Then each equals its single-job output (within the batch's float noise), not a blend of the prompts
    alone = [through_worker(worker_pipe, [j])[0] for j in jobs]
    for mixed, single in zip(batched, alone, strict=True):
        assert np.abs(mixed - single).max() <= 1
    assert np.array_equal(alone[0], alone[2])
    assert np.abs(alone[0] - alone[1]).max() > 8  # only the image prompt differs, and it shows


def test_jobs_batch_only_with_the_same_image_prompt_presence_and_scale() -> None:
    with_image = item(20, picture(120))
    assert batch_key(with_image) == batch_key(item(21, picture(121)))  # another image: same call
    assert batch_key(with_image) != batch_key(item(20))  # no image prompt: another call
    assert batch_key(with_image) != batch_key(item(20, picture(120), 0.5))  # another scale: another call


def test_image_prompts_on_a_model_without_an_ip_adapter_are_a_job_error(tiny_model: Path) -> None:
    pipe = load_pipeline(tiny_model, CPU, "float32")
    with pytest.raises(JobError, match="IP-Adapter") as caught:
        through_worker(pipe, [item(30, picture(130))])
    assert caught.value.code == "invalid_job"


def test_files_that_are_not_an_ip_adapter_for_this_unet_fail_the_load(
    tiny_model: Path, ip_files: IPAdapterFiles, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(ip_files.weights))
    save_file({k: v for k, v in state.items() if not k.startswith("ip_adapter.3.")}, str(tmp_path / "cut.safetensors"))
    save_file({"lora.down.weight": torch.zeros(2, 2)}, str(tmp_path / "lora.safetensors"))
    for name, message in (("cut", "does not fit"), ("lora", "no image_proj")):
        with pytest.raises(ValueError, match=message):
            load_ip_adapter(plain(tiny_model), IPAdapterFiles(tmp_path / f"{name}.safetensors", ip_files.image_encoder))
    (tmp_path / "ip.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="pickle"):
        load_ip_adapter(plain(tiny_model), IPAdapterFiles(tmp_path / "ip.bin", ip_files.image_encoder))


def registry_file(tmp_path: Path, tiny_model: Path, ip_adapter: str) -> Path:
    file = tmp_path / "models.toml"
    file.write_text(f'[models.tiny]\nsource = "{tiny_model}"\nip_adapter = {ip_adapter}\n\n'
                    f'[models.plain]\nsource = "{tiny_model}"\n')
    return file


def test_the_registry_names_a_models_ip_adapter(tiny_model: Path, ip_files: IPAdapterFiles, tmp_path: Path) -> None:
    (tmp_path / "ip").symlink_to(ip_files.weights.parent)
    file = registry_file(tmp_path, tiny_model,
                         f'{{ weights = "ip/{ip_files.weights.name}", image_encoder = "ip/image_encoder", scale = 0.7 }}')
    registry = ModelRegistry.build(file)
    spec = registry.get("tiny").ip_adapter
    assert spec is not None and spec.scale == 0.7
    assert spec.weights == str(tmp_path / "ip" / ip_files.weights.name)  # relative to the registry file
    assert registry.get("plain").ip_adapter is None
    (tmp_path / "tables.toml").write_text(f'[models.tiny]\nsource = "{tiny_model}"\n\n[models.tiny.ip_adapter]\n'
                                          'weights = "s3://models/ip.safetensors"\nimage_encoder = "s3://models/enc/"\n')
    remote = ModelRegistry.build(tmp_path / "tables.toml")  # a sub-table; s3:// sources; the default scale
    assert remote.get("tiny").ip_adapter == IPAdapterSpec("s3://models/ip.safetensors", "s3://models/enc/", 1.0)


@pytest.mark.parametrize(("table", "message"), [
    ('{ weights = "ip.safetensors" }', "needs 'weights'"),
    ('{ weights = "s3://models/ip.safetensors", image_encoder = "s3://models/enc", strength = 1 }', "unknown keys"),
    ('{ weights = "s3://models/ip.safetensors", image_encoder = "s3://models/enc", scale = 3.0 }', "scale=3.0"),
    ('{ weights = "s3://models/ip", image_encoder = "s3://models/enc" }', "not a weights file"),
    ('{ weights = "missing.safetensors", image_encoder = "s3://models/enc" }', "does not exist"),
    ('{ weights = "s3://models/ip.safetensors", image_encoder = "nowhere" }', "no config.json"),
    ('"s3://models/ip.safetensors"', "must be a table"),
])
def test_bad_ip_adapter_entries_say_what_is_wrong(tiny_model: Path, tmp_path: Path, table: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        ModelRegistry.build(registry_file(tmp_path, tiny_model, table))


def test_pipeline_settings_that_would_drop_the_ip_layers_are_refused(tiny_model: Path, tmp_path: Path) -> None:
    registry = ModelRegistry.build(registry_file(
        tmp_path, tiny_model, '{ weights = "s3://models/ip.safetensors", image_encoder = "s3://models/enc" }'))
    for tuning in (Tuning(attention=Attention.SLICING), Tuning(fuse_qkv=True)):
        with pytest.raises(ConfigurationError, match="IP-Adapter"):
            tuning.check(CPU, registry)
