"""LoRA slots: each job gets exactly its adapters; no adapter means exactly the base model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from darkroom.dev.demo import sample_image
from darkroom.dev.tiny import make_tiny_lora
from darkroom.worker.adapters import AdapterFile, AdapterManager
from darkroom.worker.device import DeviceInfo
from darkroom.worker.pipelines import load_pipeline

CPU = DeviceInfo("cpu", "float32", "cpu")


@pytest.fixture(scope="module")
def loras(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, AdapterFile]:
    root = tmp_path_factory.mktemp("loras")
    specs = {"u1": {"seed": 1}, "u2": {"seed": 2}, "u3": {"seed": 3}, "te": {"seed": 4, "text_encoder": True}}
    return {name: AdapterFile.inspect(make_tiny_lora(tiny_model, root / f"{name}.safetensors", **kw))
            for name, kw in specs.items()}


def fresh(tiny_model: Path) -> Any:
    return load_pipeline(tiny_model, CPU, "float32")


def render(pipe: Any) -> np.ndarray:
    out = pipe(prompt="a red boat", image=sample_image(64), strength=0.7, num_inference_steps=10,
               guidance_scale=7.0, generator=torch.Generator("cpu").manual_seed(3))
    return np.asarray(out.images[0]).astype(int)


def test_a_job_after_an_adapter_job_equals_the_base_model(tiny_model: Path, loras: dict[str, AdapterFile]) -> None:
    pipe = fresh(tiny_model)
    base = render(pipe)
    manager = AdapterManager(pipe)
    manager.activate([(loras["u1"], 1.0), (loras["te"], 0.8)])
    assert not np.array_equal(render(pipe), base)
    manager.activate([])
    assert np.array_equal(render(pipe), base)


def test_a_blend_equals_diffusers_set_adapters(tiny_model: Path, loras: dict[str, AdapterFile]) -> None:
    pipe = fresh(tiny_model)
    AdapterManager(pipe).activate([(loras["u1"], 0.6), (loras["te"], 0.3)])
    reference = fresh(tiny_model)
    reference.load_lora_weights(str(loras["u1"].path), adapter_name="x")
    reference.load_lora_weights(str(loras["te"].path), adapter_name="y")
    reference.set_adapters(["x", "y"], adapter_weights=[0.6, 0.3])
    assert np.array_equal(render(pipe), render(reference))


def test_an_adapter_loaded_after_a_base_job_is_active(tiny_model: Path, loras: dict[str, AdapterFile]) -> None:
    pipe = fresh(tiny_model)
    manager = AdapterManager(pipe)
    manager.activate([(loras["u1"], 1.0)])
    manager.activate([])  # LoRA layers disabled
    manager.activate([(loras["te"], 1.0)])  # a new file loads while the old layers are disabled
    reference = fresh(tiny_model)
    AdapterManager(reference).activate([(loras["te"], 1.0)])
    assert np.array_equal(render(pipe), render(reference))


def test_text_encoder_lora_changes_the_output(tiny_model: Path, loras: dict[str, AdapterFile]) -> None:
    assert not loras["te"].unet_only and loras["u1"].unet_only
    pipe = fresh(tiny_model)
    base = render(pipe)
    AdapterManager(pipe).activate([(loras["te"], 1.0)])
    assert not np.array_equal(render(pipe), base)


def test_full_slots_hot_swap_a_same_shaped_adapter(tiny_model: Path, loras: dict[str, AdapterFile]) -> None:
    pipe = fresh(tiny_model)
    manager = AdapterManager(pipe, max_slots=2)
    manager.activate([(loras["u1"], 1.0)])
    manager.activate([(loras["u2"], 1.0)])
    activation = manager.activate([(loras["u3"], 1.0)])  # evicts u1 (least recently used)
    assert activation.hotswapped == 1 and activation.loaded == 0
    assert set(manager.resident) == {loras["u2"].sha256, loras["u3"].sha256}
    swapped = render(pipe)
    reference = fresh(tiny_model)
    AdapterManager(reference).activate([(loras["u3"], 1.0)])
    assert np.array_equal(swapped, render(reference))


def test_switching_among_resident_adapters_loads_nothing(tiny_model: Path, loras: dict[str, AdapterFile]) -> None:
    pipe = fresh(tiny_model)
    manager = AdapterManager(pipe, max_slots=4)
    for name in ["u1", "u2", "te"]:
        manager.activate([(loras[name], 1.0)])
    loads = manager.loads
    for name in ["u2", "te", "u1", "u2"]:
        assert manager.activate([(loras[name], 0.5)]).loaded == 0
    assert manager.loads == loads


def test_a_file_that_is_not_a_lora_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from darkroom.common.errors import ErrorCode, JobError

    path = tmp_path / "weights.safetensors"
    save_file({"unet.conv.weight": torch.zeros(2)}, str(path))
    with pytest.raises(JobError) as info:
        AdapterFile.inspect(path)
    assert info.value.code is ErrorCode.ADAPTER_INVALID
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not safetensors")
    with pytest.raises(JobError):
        AdapterFile.inspect(garbage)
