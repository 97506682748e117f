"""The demo's trained tiny model does what the demo shows: low strength keeps the input's
composition, high strength moves the picture towards the prompt's colour.

The model is trained once into .darkroom/models/demo (the same cache `make demo` uses), then reused; the
``demo_model`` fixture (tests/conftest.py) trains it in the background from the session's start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from darkroom.dev.demo import DEMO_MODEL_GUIDANCE, DEMO_MODEL_SIZE, sample_image
from darkroom.dev.trained import COLOURS, build_pooling_vae, scene_batch

pytestmark = pytest.mark.slow  # trains the demo model

@pytest.fixture(scope="module")
def pipe(demo_model: Path) -> Any:
    from diffusers import StableDiffusionImg2ImgPipeline

    pipeline = StableDiffusionImg2ImgPipeline.from_pretrained(str(demo_model), safety_checker=None,
                                                              requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def run(pipe: Any, prompt: str, strength: float) -> np.ndarray:
    import torch

    image = pipe(prompt=prompt, image=sample_image(DEMO_MODEL_SIZE), strength=strength, num_inference_steps=20,
                 guidance_scale=DEMO_MODEL_GUIDANCE, generator=torch.Generator().manual_seed(1234)).images[0]
    return np.asarray(image, dtype=np.float64)


def test_the_built_vae_gives_back_the_picture_it_encodes() -> None:
    import torch

    vae = build_pooling_vae()
    images, _ = scene_batch(4, torch.Generator().manual_seed(0), size=64)
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean
        decoded = vae.decode(latents).sample
    assert torch.allclose(latents[:, :3], torch.nn.functional.avg_pool2d(images, 8), atol=2e-3)
    assert float((decoded - images).abs().mean()) < 0.2  # soft edges, same picture


def test_low_strength_keeps_the_composition(pipe: Any) -> None:
    source = np.asarray(sample_image(DEMO_MODEL_SIZE), dtype=np.float64)
    low, high = run(pipe, "red", 0.3), run(pipe, "red", 0.9)
    # Then the 0.3 output is close to the input pixel by pixel, and much closer than the 0.9 one
    assert np.abs(low - source).mean() < 50  # of 255: soft edges and a shifted palette, same picture
    assert np.abs(low - source).mean() < 0.6 * np.abs(high - source).mean()


@pytest.mark.parametrize("colour", ["red", "yellow"])
def test_high_strength_moves_towards_the_prompt_colour(pipe: Any, colour: str) -> None:
    source = np.asarray(sample_image(DEMO_MODEL_SIZE), dtype=np.float64)
    target = np.array(COLOURS[colour]) * 255
    output = run(pipe, colour, 0.9)
    distance = lambda image: float(np.linalg.norm(image.reshape(-1, 3).mean(0) - target))  # noqa: E731
    assert distance(output) < 0.7 * distance(source)
