"""The latent cache in every family: a job whose input's VAE encoding comes from the cache (a hit) gives the
same pixels as one that encodes it (a miss) and as the pipeline encoding it itself (no cache)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from darkroom.common.jobs import Img2ImgJob
from darkroom.dev.tiny import make_tiny_model
from darkroom.worker.device import DeviceInfo
from darkroom.worker.inference.call import WorkItem, run_batch
from darkroom.worker.latents import LatentCache, pixel_digest
from darkroom.worker.pipelines import load_pipeline

CPU = DeviceInfo("cpu", "float32", "cpu")


@pytest.mark.parametrize("family", ["sd", "sdxl", "sdxl-refiner", "sd3", "flux", "sd2-v"])
def test_a_cached_encoding_gives_the_pixels_of_a_fresh_one(family: str, tmp_path: Path) -> None:
    # Given a tiny model of the family and one input used by two variants (different prompts and seeds)
    pipe = load_pipeline(make_tiny_model(tmp_path / family, family=family), CPU, "float32")
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    jobs = [Img2ImgJob(model="m", image="s3://inputs/x.png", prompt=f"a quay, variant {i}", seed=10 + i, strength=0.6,
                       num_inference_steps=4, guidance_scale=4.0, job_id=f"v{i}") for i in range(2)]
    items = [WorkItem(j, image, j.seeds(), digest=pixel_digest(image)) for j in jobs]
    cache = LatentCache(64 * 2**20)

    def pixels(item: WorkItem, latents: LatentCache | None) -> np.ndarray:
        return np.asarray(run_batch(pipe, [item], latents=latents).images[0][0]).astype(int)

    # When the variants run with the cache (a miss, then a hit) and without it
    cached = [pixels(item, cache) for item in items]
    plain = [pixels(item, None) for item in items]
    # Then the cache was used, and every image equals the pipeline's own encoding bit for bit
    assert (cache.misses, cache.hits) == (1, 1)
    for got, expected in zip(cached, plain, strict=True):
        assert np.array_equal(got, expected)
    assert not np.array_equal(cached[0], cached[1])
