"""The tiny random-weight SD img2img model (darkroom.dev.tiny): build, save, load, run."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from darkroom.dev.tiny import is_tiny_model_dir, make_tiny_model


def _file_hashes(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def _weight_hashes(directory: Path) -> dict[str, str]:
    return {name: h for name, h in _file_hashes(directory).items() if name.endswith(".safetensors")}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def test_import_is_cheap() -> None:
    code = "import sys, darkroom.dev.tiny; sys.exit(int('torch' in sys.modules or 'diffusers' in sys.modules))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


def test_same_seed_same_bytes_other_seed_other_weights(model_dir: Path, tmp_path: Path) -> None:
    again = make_tiny_model(tmp_path / "again", seed=0)
    other = make_tiny_model(tmp_path / "other", seed=1)

    assert len(_weight_hashes(model_dir)) == 3  # unet, vae, text_encoder
    assert _file_hashes(again) == _file_hashes(model_dir)
    different = {k for k, v in _weight_hashes(other).items() if _weight_hashes(model_dir)[k] != v}
    assert different == set(_weight_hashes(model_dir))
    # No temp dirs left next to the targets.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other"]


def test_existing_directory_handling(model_dir: Path, tmp_path: Path) -> None:
    before = _file_hashes(model_dir)
    assert make_tiny_model(model_dir, seed=7) == model_dir  # complete model: left untouched
    assert _file_hashes(model_dir) == before

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        make_tiny_model(junk)
    with pytest.raises(FileExistsError):
        make_tiny_model(junk, overwrite=True)  # never deletes what is not a model
    assert (junk / "keep.txt").read_text() == "mine"
    assert not is_tiny_model_dir(junk)


def test_loads_offline_and_runs_img2img(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = StableDiffusionImg2ImgPipeline.from_pretrained(model_dir, local_files_only=True)
    assert [str(w.message) for w in caught] == []
    pipe.set_progress_bar_config(disable=True)

    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings == 77
    assert len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size

    # The VAE downscales 8x, like the real SD one.
    assert pipe.vae_scale_factor == 8
    with torch.no_grad():
        latents = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert tuple(latents.shape) == (1, 4, 8, 8)

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))

    def run() -> Image.Image:
        return pipe(
            prompt="a photo of a cat",
            image=image,
            strength=0.75,
            num_inference_steps=4,
            guidance_scale=7.5,
            generator=torch.Generator("cpu").manual_seed(1),
        ).images[0]

    first, second = run(), run()
    assert first.size == (64, 64)
    assert np.array_equal(np.asarray(first), np.asarray(second))
