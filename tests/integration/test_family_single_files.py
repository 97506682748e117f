"""Single-file checkpoints of every family through a real worker.

SDXL (base and refiner) and SD3 files in their original layouts, with a weightless config folder, run to the
same PNG as the folder model with the same seed; a single-file Flux entry stops the worker at start-up, saying
to use a diffusers folder instead.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from darkroom.common.settings import Settings
from darkroom.dev.process import WorkerProcess
from darkroom.dev.single_files import make_single_file
from darkroom.dev.tiny import make_tiny_model
from darkroom.producer.client import Client
from darkroom.worker.checkpoints import copy_config_folder

from ..helpers import png_bytes
from .helpers import spawn_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# tiny family -> the family-specific fields of its test job
FAMILIES: dict[str, dict[str, Any]] = {
    "sdxl": {"prompt_2": "blue stripes", "negative_prompt": "blurry", "original_size": (128, 128)},
    "sdxl-refiner": {"aesthetic_score": 7.0, "negative_prompt": "blurry"},
    "sd3": {"prompt_3": "a watercolor sea", "negative_prompt": "blurry", "max_sequence_length": 32},
}
COMMON = {"prompt": "a red cat", "strength": 0.7, "num_inference_steps": 4, "guidance_scale": 5.0, "seed": 5}


@pytest.fixture(scope="module")
def files_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Per family: its tiny folder model, that model as one original-layout .safetensors, and a copy of the
    folder's configs and tokenizers without weights."""
    root = tmp_path_factory.mktemp("family-files")
    for family in FAMILIES:
        folder = make_tiny_model(root / family, family=family)
        make_single_file(root / f"{family}.safetensors", folder)
        copy_config_folder(folder, root / f"{family}-config")
    return root


@pytest.fixture(scope="module")
def files_worker(services: object, settings: Settings, files_root: Path) -> Iterator[WorkerProcess]:
    registry = files_root / "registry.toml"
    registry.write_text("".join(
        f'[models.{family}-folder]\nsource = "{family}"\n'
        f'[models.{family}-file]\nsource = "{family}.safetensors"\nconfig = "{family}-config"\n'
        for family in FAMILIES
    ))
    process = spawn_worker(services, settings, f"family-files-{uuid.uuid4().hex[:6]}", "--models-file", str(registry),
                           "--no-preload", DARKROOM_SAFETY_CHECKER="none").start(timeout=180)
    try:
        yield process
    finally:
        process.stop()


def run_job(client: Client, model: str, uri: str, extra: dict[str, Any]) -> np.ndarray:
    result = client.submit({"model": model, "image": uri, **COMMON, **extra}).wait(timeout=300)
    return np.asarray(Image.open(io.BytesIO(client.download(result.uris[0]))).convert("RGB"))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_single_file_model_of_the_family_equals_its_folder_model(client: Client, files_worker: WorkerProcess,
                                                                   family: str) -> None:
    # Given one input picture
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    uri = client.upload(png_bytes(image), f"s3://darkroom/inputs/{uuid.uuid4().hex}.png")
    # When the same job runs on the folder model and on its single-file checkpoint
    folder = run_job(client, f"{family}-folder", uri, FAMILIES[family])
    single = run_job(client, f"{family}-file", uri, FAMILIES[family])
    # Then the fleet knows both as the family, and the outputs are the same pixels
    catalog = client.fleet.catalog()
    assert catalog[f"{family}-file"] == catalog[f"{family}-folder"] == family.removesuffix("-refiner")
    # the same pixels but for rounding: the file's tensors are converted from the original layout, and on some
    # CPUs a converted tensor's memory layout picks another kernel whose float sums round differently
    diff = np.abs(single.astype(np.int16) - folder.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # measured: at most 2 of 12,288 values, by 1


def test_a_single_file_flux_entry_stops_the_worker_at_start_up(services: Any, tmp_path: Path) -> None:
    # Given a registry entry naming a Flux single file with a Flux config folder
    folder = make_tiny_model(tmp_path / "flux", family="flux")
    config = copy_config_folder(folder, tmp_path / "flux-config")
    (tmp_path / "flux.safetensors").write_bytes(b"{}")  # never read: the entry is refused before loading
    registry = tmp_path / "registry.toml"
    registry.write_text(f'[models.flux]\nsource = "flux.safetensors"\nconfig = "{config}"\n')
    env = {**os.environ, **services.as_env(), "DARKROOM_STATE_DIR": str(tmp_path / "state")}
    # When a worker starts with it
    run = subprocess.run([sys.executable, "-m", "darkroom.worker", "worker", "--models-file", str(registry)],
                         env=env, capture_output=True, text=True, timeout=300)
    # Then it exits, naming the model, the family and what to use instead
    assert run.returncode != 0
    assert "model 'flux'" in run.stderr and "is a single-file flux checkpoint" in run.stderr, run.stderr[-2000:]
    assert "use a diffusers folder as the source" in run.stderr
