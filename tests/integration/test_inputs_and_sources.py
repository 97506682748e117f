"""Issue 7 through real workers: resize policies, single-file checkpoints (local and s3://) and worker pipeline
settings, each compared pixel for pixel with a direct diffusers call; settings that cannot apply stop the worker."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from darkroom.common.errors import ErrorCode, JobFailed
from darkroom.common.settings import Settings
from darkroom.dev.demo import sample_image
from darkroom.dev.process import WorkerProcess
from darkroom.dev.tiny import make_tiny_single_file
from darkroom.producer.client import Client
from darkroom.worker.checkpoints import copy_config_folder
from darkroom.worker.filecache import push_files

from ..conftest import png_bytes
from .conftest import plain_pipeline, spawn_worker
from .test_walking_skeleton import fetch_image

pytestmark = pytest.mark.integration

PARAMS: dict[str, Any] = {"prompt": "a lighthouse at dusk", "strength": 0.7, "num_inference_steps": 4,
                          "guidance_scale": 6.0, "seed": 3}


def diffusers_pipe(tiny_model: Path, setup: Any = None) -> Any:
    pipe = plain_pipeline(tiny_model)
    if setup is not None:
        setup(pipe)
    return pipe


def direct(pipe: Any, image: Image.Image) -> np.ndarray:
    import torch

    params = {k: v for k, v in PARAMS.items() if k != "seed"}
    out = pipe(image=image, generator=torch.Generator("cpu").manual_seed(PARAMS["seed"]), **params)
    return np.asarray(out.images[0])


def upload(client: Client, image: Image.Image) -> str:
    return client.upload(png_bytes(image), f"s3://darkroom/inputs/{uuid.uuid4().hex}.png")


def run_job(client: Client, model: str, uri: str, **extra: Any) -> np.ndarray:
    result = client.submit({"model": model, "image": uri, **PARAMS, **extra}).wait(timeout=300)
    return fetch_image(client, result.uris[0])


def assert_same(produced: np.ndarray, expected: np.ndarray) -> None:
    assert produced.shape == expected.shape
    assert np.array_equal(produced, expected), f"max diff {np.abs(produced.astype(int) - expected).max()}"


# -- resize policies ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "fields", "diffusers_resize", "out"),
    [
        ((70, 45), {}, None, (40, 64)),  # keep: diffusers itself brings 70x45 to 64x40
        ((96, 64), {"resize_mode": "crop_resize", "width": 64, "height": 64}, (64, 64, "crop"), (64, 64)),
        ((64, 96), {"resize_mode": "resize_fill", "width": 64, "height": 48}, (64, 48, "fill"), (48, 64)),
        ((128, 80), {"resize_mode": "resize", "max_pixels": 4096}, (80, 48, "default"), (48, 80)),
    ],
    ids=["keep", "crop_resize", "resize_fill", "resize-max_pixels"],
)
def test_a_resize_policy_equals_diffusers_on_the_same_resized_image(
    client: Client, worker: WorkerProcess, tiny_model: Path, size: tuple[int, int], fields: dict[str, Any],
    diffusers_resize: tuple[int, int, str] | None, out: tuple[int, int],
) -> None:
    # Given an input of an awkward size and a job with a resize policy
    image = sample_image(max(size)).resize(size)
    produced = run_job(client, "tiny", upload(client, image), **fields)
    # Then the output equals diffusers given the image resized by its own image processor in that mode
    pipe = diffusers_pipe(tiny_model)
    if diffusers_resize is not None:
        width, height, mode = diffusers_resize
        image = pipe.image_processor.resize(image, height=height, width=width, resize_mode=mode)
    assert produced.shape[:2] == out
    assert_same(produced, direct(pipe, image))


# -- single-file checkpoints and worker settings ------------------------------------------------------------
TUNED = {"DARKROOM_VAE_SLICING": "true", "DARKROOM_VAE_TILING": "true", "DARKROOM_FUSE_QKV": "true",
         "DARKROOM_CHANNELS_LAST": "true"}


def tuned_like_the_worker(pipe: Any) -> None:
    import torch

    pipe.vae.enable_slicing()
    pipe.vae.enable_tiling()
    pipe.fuse_qkv_projections()
    pipe.unet.to(memory_format=torch.channels_last)


@pytest.fixture(scope="module")
def sources_worker(services: Any, settings: Settings, tiny_model: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """A worker with CPU pipeline settings on, serving the tiny model three ways: its folder, the same
    weights as one local .safetensors in the LDM layout, and that file on s3:// (config on s3:// too)."""
    root = tmp_path_factory.mktemp("sources")
    file = make_tiny_single_file(root / "tiny-ldm.safetensors", tiny_model)
    config = copy_config_folder(tiny_model, root / "config")
    prefix = f"s3://darkroom/models/{uuid.uuid4().hex}"
    with Client(settings) as c:
        push_files(c.store, file, prefix)
        push_files(c.store, config, f"{prefix}/config")
    registry = root / "registry.toml"
    registry.write_text(
        f'[models.folder]\nsource = "{tiny_model}"\nadapters = []\n'
        '[models.file]\nsource = "tiny-ldm.safetensors"\nconfig = "config"\nadapters = []\n'
        f'[models.remote]\nsource = "{prefix}/tiny-ldm.safetensors"\nconfig = "{prefix}/config"\nadapters = []\n'
    )
    process = spawn_worker(services, settings, f"sources-{uuid.uuid4().hex[:6]}", "--models-file", str(registry),
                           state_dir=root / "state", **TUNED).start(timeout=180)
    try:
        yield process
    finally:
        process.stop()


def test_a_single_file_model_local_or_s3_equals_its_folder_model(client: Client,
                                                                 sources_worker: WorkerProcess) -> None:
    uri = upload(client, sample_image(64))
    folder, local, remote = (run_job(client, model, uri) for model in ("folder", "file", "remote"))
    assert_same(local, folder)
    assert_same(remote, folder)


def test_worker_settings_equal_diffusers_with_the_same_settings(client: Client, sources_worker: WorkerProcess,
                                                                tiny_model: Path) -> None:
    image = sample_image(64)
    produced = run_job(client, "folder", upload(client, image))
    assert_same(produced, direct(diffusers_pipe(tiny_model, tuned_like_the_worker), image))


def test_the_settings_are_in_the_workers_report(settings: Settings, sources_worker: WorkerProcess) -> None:
    from darkroom.common.cli import main

    env = {"DARKROOM_STATE_DIR": str(settings.state_dir), "DARKROOM_REDIS_URL": settings.redis_url.get_secret_value()}
    listing = CliRunner().invoke(main, ["workers"], env=env)
    assert listing.exit_code == 0, listing.output
    lines = listing.output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(sources_worker.name))
    block = [lines[start], *itertools.takewhile(lambda line: line.startswith("  "), lines[start + 1:])]
    assert "  tuning:   attention=sdpa, vae_slicing, vae_tiling, fuse_qkv, channels_last, cpu_offload=none" in block


def test_adapters_are_refused_where_fused_projections_would_bypass_them(client: Client,
                                                                        sources_worker: WorkerProcess) -> None:
    uri = upload(client, sample_image(64))
    with pytest.raises(JobFailed) as info:
        client.submit({"model": "folder", "image": uri, **PARAMS,
                       "adapters": [{"uri": "s3://darkroom/loras/x.safetensors"}]}).wait(timeout=120)
    assert info.value.code == ErrorCode.ADAPTER_NOT_ALLOWED


# -- refused at start-up --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DARKROOM_CPU_OFFLOAD": "model"}, "DARKROOM_CPU_OFFLOAD=model: offloading moves weights between CPU"),
        ({"DARKROOM_DTYPE": "float16"}, "dtype 'float16' on a CPU"),
    ],
    ids=["cpu-offload", "fp16"],  # every other case: tests/unit/test_tuning.py
)
def test_a_setting_that_cannot_apply_stops_the_worker_at_start_up(services: Any, tiny_model: Path, tmp_path: Path,
                                                                  env: dict[str, str], message: str) -> None:
    full = {**os.environ, **services.as_env(), "DARKROOM_STATE_DIR": str(tmp_path),  # type: ignore[attr-defined]
            "DARKROOM_DEVICE": "cpu", **env}
    run = subprocess.run([sys.executable, "-m", "darkroom.worker", "worker", "--model", f"tiny={tiny_model}"],
                         env=full, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert message in run.stderr, run.stderr[-2000:]
