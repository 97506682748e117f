"""The resident-model cache: a byte budget measured from loaded weights, LRU eviction that frees
memory, and byte-identical components loaded once."""

from __future__ import annotations

import gc
import hashlib
import threading
import weakref
from pathlib import Path

import pytest

from darkroom.common.errors import ErrorCode, JobError
from darkroom.dev.tiny import make_tiny_model
from darkroom.worker.device import DeviceInfo
from darkroom.worker.filecache import FileCache, sha256_file
from darkroom.worker.pipelines import PipelineCache, module_bytes_all
from darkroom.worker.registry import ModelRegistry


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cache-models")
    # a, b, c differ everywhere; a_twin is byte-identical to a (same seed)
    return {name: make_tiny_model(root / name, seed=seed) for name, seed in
            [("a", 1), ("b", 2), ("c", 3), ("a_twin", 1)]}


def cache_for(models: dict[str, Path], tmp_path: Path, budget: int) -> PipelineCache:
    registry = ModelRegistry.build(pairs=[f"{k}={v}" for k, v in models.items()])
    return PipelineCache(registry, DeviceInfo("cpu", "float32", "cpu"), FileCache(tmp_path, store=None),  # type: ignore[arg-type]
                         budget_bytes=budget)


def one_model_bytes(models: dict[str, Path], tmp_path: Path) -> int:
    cache = cache_for(models, tmp_path, 10**12)
    return module_bytes_all(cache.get("a").pipeline)


def test_lru_eviction_keeps_the_cache_within_its_budget(models: dict[str, Path], tmp_path: Path) -> None:
    size = one_model_bytes(models, tmp_path)
    cache = cache_for(models, tmp_path, int(size * 2.5))
    seen_max = 0
    for model_id in ["a", "b", "a", "c", "b"]:
        cache.get(model_id)
        seen_max = max(seen_max, cache.resident_bytes())
    # a, b loaded; a touched; c evicts b (least recently used); b evicts a
    assert cache.resident == ["c", "b"]
    assert cache.evictions == 2 and cache.hits == 1 and cache.misses == 4
    assert seen_max <= cache.budget_bytes


def test_eviction_releases_the_weights(models: dict[str, Path], tmp_path: Path) -> None:
    size = one_model_bytes(models, tmp_path)
    cache = cache_for(models, tmp_path, int(size * 1.5))
    unet = weakref.ref(cache.get("a").pipeline.unet)
    cache.get("b")
    gc.collect()
    assert cache.resident == ["b"]
    assert unet() is None, "the evicted model's UNet is still referenced somewhere"


def test_identical_vae_is_loaded_once(models: dict[str, Path], tmp_path: Path) -> None:
    cache = cache_for(models, tmp_path, 10**12)
    a, twin, b = cache.get("a"), cache.get("a_twin"), cache.get("b")
    assert a.pipeline.vae is twin.pipeline.vae
    assert a.pipeline.vae is not b.pipeline.vae
    assert a.pipeline.unet is not twin.pipeline.unet  # adapters are injected per model: never shared
    vae = sum(t.numel() * t.element_size() for t in a.pipeline.vae.parameters())
    total = module_bytes_all(a.pipeline) + module_bytes_all(twin.pipeline) + module_bytes_all(b.pipeline)
    assert cache.resident_bytes() <= total - vae  # the shared VAE is counted once


def test_a_model_larger_than_the_budget_fails_the_job_clearly(models: dict[str, Path], tmp_path: Path) -> None:
    cache = cache_for(models, tmp_path, 1000)
    with pytest.raises(JobError) as info:
        cache.get("a")
    assert info.value.code is ErrorCode.MODEL_TOO_LARGE and "budget is 1000" in info.value.message


def test_loaded_bytes_read_each_tensors_stored_type(tmp_path: Path) -> None:
    """fp16 files without '.fp16.' in their name are not halved again; fp32 tensors halve at 16-bit."""
    import torch
    from safetensors.torch import save_file

    from darkroom.worker.pipelines import _loaded_bytes

    mixed = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({"a": torch.zeros(1000, dtype=torch.float32), "b": torch.zeros(1000, dtype=torch.float16)}, str(mixed))
    assert _loaded_bytes(mixed, "float16") == 4000 // 2 + 2000
    assert _loaded_bytes(mixed, "float32") == mixed.stat().st_size
    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    assert _loaded_bytes(garbage, "float16") == 64


def test_the_weights_identity_is_hashed_beside_the_load(models: dict[str, Path], tmp_path: Path) -> None:
    cache = cache_for(models, tmp_path, 10**12)
    threads: list[str] = []
    file_hash = cache._file_hash

    def recording(file: Path) -> str:
        threads.append(threading.current_thread().name)
        return file_hash(file)

    cache._file_hash = recording  # type: ignore[method-assign]
    a, twin, b = cache.get("a"), cache.get("a_twin"), cache.get("b")
    digest = hashlib.sha256()
    for file in sorted(p for p in models["a"].rglob("*") if p.is_file()):
        digest.update(file.relative_to(models["a"]).as_posix().encode())
        digest.update(sha256_file(file).encode())
    assert a.weights_sha256 == twin.weights_sha256 == digest.hexdigest()  # what result.json names the model by
    assert b.weights_sha256 != a.weights_sha256
    assert "darkroom-model-hash" in threads  # on its own thread, while the pipeline loaded


def test_a_model_whose_files_cannot_be_hashed_fails_its_load(models: dict[str, Path], tmp_path: Path) -> None:
    cache = cache_for(models, tmp_path, 10**12)

    file_hash = cache._file_hash

    def broken(file: Path) -> str:  # fails on the hashing thread only (the VAE's fingerprint is taken before)
        if threading.current_thread().name == "darkroom-model-hash":
            raise PermissionError(f"cannot read {file}")
        return file_hash(file)

    cache._file_hash = broken  # type: ignore[method-assign]
    with pytest.raises(PermissionError):
        cache.get("c")
    assert cache.resident == []
