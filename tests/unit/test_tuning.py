"""Worker pipeline settings: each one that can apply on a CPU gives exactly what diffusers gives with
the same setting; each one that cannot apply here stops the worker at start-up, saying which, why and what to do."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from darkroom.common.errors import ConfigurationError
from darkroom.worker.compile_cache import CACHE_ENV
from darkroom.worker.device import DeviceInfo, select_device
from darkroom.worker.filecache import FileCache
from darkroom.worker.pipelines import PipelineCache, load_pipeline
from darkroom.worker.registry import ModelRegistry, ModelSpec
from darkroom.worker.tuning import Attention, Offload, Tuning

CPU = DeviceInfo("cpu", "float32", "cpu")
CALL = {"prompt": "a red boat", "strength": 0.75, "num_inference_steps": 4, "guidance_scale": 6.0}


def outputs(pipe: Any, size: int, count: int = 1) -> np.ndarray:
    import torch

    from darkroom.dev.demo import sample_image

    pipe.set_progress_bar_config(disable=True)
    image = sample_image(size)
    out = pipe(**{**CALL, "prompt": [CALL["prompt"]] * count}, image=[image] * count, num_images_per_prompt=1,
               generator=[torch.Generator("cpu").manual_seed(7 + i) for i in range(count)])
    return np.stack([np.asarray(im) for im in out.images]).astype(int)


def diffusers_pipe(tiny_model: Path, setup: Callable[[Any], Any]) -> Any:
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(str(tiny_model), safety_checker=None,
                                                          requires_safety_checker=False)
    setup(pipe)
    return pipe


def _channels_last(pipe: Any) -> None:
    import torch

    pipe.unet.to(memory_format=torch.channels_last)


# (our tuning, the same thing done the diffusers way, image size, images per call,
#  largest difference from default settings in uint8 steps: the documented tolerance)
SETTINGS = {
    "attention-slicing": (Tuning(attention=Attention.SLICING), lambda p: p.enable_attention_slicing(), 64, 1, 1),
    "vae-slicing": (Tuning(vae_slicing=True), lambda p: p.vae.enable_slicing(), 64, 2, 1),
    "vae-tiling": (Tuning(vae_tiling=True), lambda p: p.vae.enable_tiling(), 288, 1, None),  # tiles blend: differs
    "fuse-qkv": (Tuning(fuse_qkv=True), lambda p: p.fuse_qkv_projections(), 64, 1, 1),
    "channels-last": (Tuning(channels_last=True), _channels_last, 64, 1, 1),
}


@pytest.fixture(scope="module")
def default_pipe(tiny_model: Path) -> Any:
    return load_pipeline(tiny_model, CPU, "float32", tuning=Tuning())


@pytest.mark.slow  # a pipeline run per setting, twice
@pytest.mark.parametrize("name", list(SETTINGS))
def test_each_cpu_setting_equals_diffusers_with_that_setting(name: str, tiny_model: Path, default_pipe: Any) -> None:
    tuning, setup, size, count, tolerance = SETTINGS[name]
    # Given the worker's loader with one setting on
    ours = outputs(load_pipeline(tiny_model, CPU, "float32", tuning=tuning), size, count)
    # Then it equals diffusers with the same setting, pixel for pixel
    assert np.array_equal(ours, outputs(diffusers_pipe(tiny_model, setup), size, count))
    # and stays within the documented tolerance of the default settings
    if tolerance is not None:
        assert np.abs(ours - outputs(default_pipe, size, count)).max() <= tolerance


def test_vae_tiling_leaves_images_below_the_tile_size_unchanged(tiny_model: Path, default_pipe: Any) -> None:
    tiled = load_pipeline(tiny_model, CPU, "float32", tuning=Tuning(vae_tiling=True))
    assert np.array_equal(outputs(tiled, 64), outputs(default_pipe, 64))


def test_every_option_is_applied_to_the_loaded_pipeline(tiny_model: Path) -> None:
    import torch

    pipe = load_pipeline(tiny_model, CPU, "float32", tuning=Tuning(vae_slicing=True, vae_tiling=True, fuse_qkv=True,
                                                                   channels_last=True))
    assert pipe.vae.use_slicing and pipe.vae.use_tiling and pipe.fusing_unet and pipe.fusing_vae
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


# -- refused at start-up -------------------------------------------------------------------------------
def registry(tmp_path: Path, tiny_model: Path, adapters: tuple[str, ...] | None = None) -> ModelRegistry:
    reg = ModelRegistry()
    reg.add(ModelSpec("tiny", str(tiny_model), allowed_adapters=adapters))
    return reg


def refusal(tuning: Tuning, device: DeviceInfo = CPU, reg: ModelRegistry | None = None) -> str:
    with pytest.raises(ConfigurationError) as info:
        tuning.check(device, reg)
    return str(info.value)


def test_xformers_that_cannot_run_here_is_refused() -> None:
    message = refusal(Tuning(attention=Attention.XFORMERS))
    assert "DARKROOM_ATTENTION=xformers" in message and ("not installed" in message or "CUDA only" in message)
    assert "sdpa" in message


@pytest.mark.parametrize("mode", [Offload.MODEL, Offload.SEQUENTIAL])
def test_cpu_offload_without_cuda_is_refused(mode: Offload) -> None:
    message = refusal(Tuning(cpu_offload=mode))
    assert f"DARKROOM_CPU_OFFLOAD={mode.value}" in message and "runs on cpu" in message and "set it to none" in message


def test_float16_on_a_cpu_is_refused_for_the_worker_and_for_a_registry_model(tiny_model: Path,
                                                                             tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="dtype 'float16' on a CPU.*use float32"):
        select_device("cpu", "float16")
    reg = ModelRegistry()
    reg.add(ModelSpec("half", str(tiny_model), dtype="fp16"))
    with pytest.raises(ConfigurationError, match="model 'half': dtype 'fp16' on a CPU"):
        PipelineCache(reg, CPU, FileCache(tmp_path, store=None), budget_bytes=10**9)  # type: ignore[arg-type]
    assert select_device("cpu", "bf16").dtype == "bfloat16"  # slow without AVX-512, but it runs


@pytest.mark.slow  # a subprocess that imports torch and tries to compile
def test_compile_without_a_working_compiler_is_refused() -> None:
    # in a fresh process: torch caches what it finds out about its compiler
    probe = ("from darkroom.worker.device import DeviceInfo\nfrom darkroom.worker.tuning import Tuning\n"
             "Tuning(compile=True).check(DeviceInfo('cpu', 'float32', 'cpu'))")
    run = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "CXX": "/nonexistent/g++"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "DARKROOM_COMPILE=true: torch.compile does not work on cpu" in run.stderr
    assert "No working C++ compiler" in run.stderr and "DARKROOM_COMPILE=false" in run.stderr


def test_compile_passes_the_check_where_a_compiler_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)  # no remembered probe (compile_cache.probe_marker): run it
    Tuning(compile=True).check(CPU)


@pytest.mark.parametrize("flag", ["fuse_qkv", "compile"])
def test_options_that_bypass_lora_are_refused_while_models_accept_adapters(flag: str, tiny_model: Path,
                                                                          tmp_path: Path) -> None:
    tuning = Tuning(**{flag: True})  # type: ignore[arg-type]
    message = refusal(tuning, reg=registry(tmp_path, tiny_model))
    assert f"DARKROOM_{flag.upper()}=true" in message and "models tiny accept adapters" in message
    assert "adapters = []" in message
    if flag == "fuse_qkv":  # no adapters anywhere: allowed (compile would run its compiler probe here)
        tuning.check(CPU, registry(tmp_path, tiny_model, adapters=()))
    else:  # compile with adapters held in slots: allowed
        assert "DARKROOM_ADAPTER_LAYERS=slots" in message
        Tuning(compile=True, adapter_slots=True).check(CPU, registry(tmp_path, tiny_model))


@pytest.mark.parametrize(("layers", "compile", "slots"), [("auto", False, False), ("auto", True, True),
                                                           ("peft", True, False), ("slots", False, True)])
def test_adapter_layers_auto_means_slots_exactly_when_compiling(layers: str, compile: bool, slots: bool) -> None:
    from darkroom.worker.settings import WorkerSettings

    settings = WorkerSettings(adapter_layers=layers, compile=compile,  # type: ignore[arg-type]
                              compile_warmup_sizes="64x64, 512x768")  # type: ignore[arg-type]
    tuning = Tuning.from_settings(settings)
    assert tuning.adapter_slots is slots and tuning.warmup_sizes == ((64, 64), (512, 768))


@pytest.mark.parametrize("sizes", ["512", "512x", "500x512", "0x0", "8192x512"])
def test_a_warm_up_size_that_is_not_width_x_height_is_refused(sizes: str) -> None:
    from pydantic import ValidationError

    from darkroom.worker.settings import WorkerSettings

    with pytest.raises(ValidationError, match="WIDTHxHEIGHT"):
        WorkerSettings(compile_warmup_sizes=sizes)  # type: ignore[arg-type]


def test_fused_qkv_with_another_attention_kernel_is_refused() -> None:
    message = refusal(Tuning(fuse_qkv=True, attention=Attention.SLICING))
    assert "DARKROOM_FUSE_QKV=true" in message and "DARKROOM_ATTENTION=slicing" in message


def test_every_problem_is_listed_at_once() -> None:
    message = refusal(Tuning(compile=True, cpu_offload=Offload.SEQUENTIAL))
    assert "DARKROOM_CPU_OFFLOAD=sequential" in message and "DARKROOM_COMPILE=true with" in message


def test_the_report_names_every_setting() -> None:
    assert Tuning(vae_tiling=True).describe() == {
        "attention": "sdpa", "vae_slicing": False, "vae_tiling": True, "fuse_qkv": False, "channels_last": False,
        "compile": False, "cpu_offload": "none", "adapter_slots": False}


def test_the_report_names_slot_and_compile_settings_only_where_they_apply() -> None:
    described = Tuning(compile=True, adapter_slots=True, lora_max_rank=8,
                       warmup_sizes=((512, 512), (768, 512))).describe()
    assert described["lora_max_rank"] == 8 and described["warmup_sizes"] == "512x512,768x512"
    assert "warmup_sizes" not in Tuning(adapter_slots=True).describe()
