"""Single-file checkpoints: the tiny model written in the original LDM layout loads, offline, through
diffusers' from_single_file to exactly the folder model; pickle files need DARKROOM_ALLOW_PICKLE_WEIGHTS; a
registry entry says what is missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from darkroom.common.errors import ConfigurationError, ErrorCode, JobError
from darkroom.dev.tiny import make_tiny_single_file
from darkroom.worker.checkpoints import copy_config_folder, is_single_file, load_single_file
from darkroom.worker.device import DeviceInfo
from darkroom.worker.filecache import FileCache
from darkroom.worker.pipelines import PipelineCache
from darkroom.worker.registry import ModelRegistry, ModelSpec

CPU = DeviceInfo("cpu", "float32", "cpu")


@pytest.fixture(scope="module")
def single(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("single-file")
    return {"file": make_tiny_single_file(root / "tiny.safetensors", tiny_model),
            "ckpt": make_tiny_single_file(root / "tiny.ckpt", tiny_model),
            "config": copy_config_folder(tiny_model, root / "config")}


def assert_same_weights(a: Any, b: Any) -> None:
    import torch

    for name in ("unet", "vae", "text_encoder"):
        left, right = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert left.keys() == right.keys(), name
        assert all(torch.equal(left[k], right[k]) for k in left), name
    assert dict(a.scheduler.config) == dict(b.scheduler.config)


def test_the_config_folder_holds_configs_and_tokenizer_but_no_weights(single: dict[str, Path]) -> None:
    files = {p.relative_to(single["config"]).as_posix() for p in single["config"].rglob("*") if p.is_file()}
    assert {"model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
            "scheduler/scheduler_config.json"} <= files
    assert any(f.startswith("tokenizer/") for f in files)
    assert not any(f.endswith((".safetensors", ".bin")) for f in files)


def test_the_ldm_layout_round_trips_through_diffusers_to_the_same_weights(single: dict[str, Path],
                                                                         tiny_model: Path) -> None:
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline
    from safetensors import safe_open

    with safe_open(str(single["file"]), framework="pt") as handle:
        keys = list(handle.keys())
    # Given a file under the original names (UNet, VAE, CLIP text encoder)
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys and "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    # When diffusers converts it with configs from a weightless folder, offline
    loaded = load_single_file(single["file"], single["config"], torch.float32)
    # Then every tensor equals the folder model's
    folder = StableDiffusionImg2ImgPipeline.from_pretrained(str(tiny_model), safety_checker=None,
                                                            requires_safety_checker=False)
    assert_same_weights(loaded, folder)


def test_a_pickle_checkpoint_is_refused_at_start_up_unless_allowed(single: dict[str, Path], tmp_path: Path) -> None:
    registry = ModelRegistry()
    registry.add(ModelSpec("old", str(single["ckpt"]), config=str(single["config"])))
    files = FileCache(tmp_path, store=None)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError) as info:
        PipelineCache(registry, CPU, files, budget_bytes=10**9)
    assert "model 'old'" in str(info.value) and "pickle checkpoint (.ckpt)" in str(info.value)
    assert "DARKROOM_ALLOW_PICKLE_WEIGHTS=true" in str(info.value)
    # allowed: it loads (torch.load with weights_only) to the same model as the .safetensors file
    registry.add(ModelSpec("new", str(single["file"]), config=str(single["config"])))
    cache = PipelineCache(registry, CPU, files, budget_bytes=10**9, allow_pickle=True)
    assert_same_weights(cache.get("old").pipeline, cache.get("new").pipeline)


def test_a_file_that_is_not_this_architecture_fails_its_job_with_a_reason(single: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    junk = tmp_path / "junk.safetensors"
    save_file({"foo": torch.zeros(3)}, str(junk))
    registry = ModelRegistry()
    registry.add(ModelSpec("junk", str(junk), config=str(single["config"])))
    with pytest.raises(JobError) as info:
        PipelineCache(registry, CPU, FileCache(tmp_path, store=None), budget_bytes=10**9).get("junk")  # type: ignore[arg-type]
    assert info.value.code is ErrorCode.MODEL_LOAD_FAILED
    assert "junk.safetensors does not fit the architecture of" in info.value.message


@pytest.mark.parametrize(
    ("source", "config", "message"),
    [
        ("tiny.safetensors", None, "needs a 'config' in the registry file"),
        ("missing.safetensors", "config", "checkpoint file .* does not exist"),
        ("tiny.safetensors", "nowhere", "config .* is not a diffusers folder"),
        ("folder", "config", "'config' is only for single-file checkpoints"),
    ],
)
def test_registry_entries_for_single_files_say_what_is_wrong(single: dict[str, Path], tiny_model: Path,
                                                              source: str, config: str | None, message: str) -> None:
    root = single["file"].parent
    paths = {"folder": str(tiny_model), "config": str(single["config"])}
    spec = ModelSpec("m", paths.get(source, str(root / source)),
                     config=None if config is None else paths.get(config, str(root / config)))
    with pytest.raises(ConfigurationError, match=message):
        ModelRegistry().add(spec)


def test_a_registry_file_names_single_files_with_relative_paths(single: dict[str, Path]) -> None:
    root = single["file"].parent
    file = root / "registry.toml"
    file.write_text('[models.one]\nsource = "tiny.safetensors"\nconfig = "config"\n'
                    '[models.two]\nsource = "s3://models/tiny.safetensors"\nconfig = "s3://models/sd-config"\n')
    registry = ModelRegistry.build(file)
    one, two = registry.get("one"), registry.get("two")
    assert (one.source, one.config) == (str(single["file"]), str(single["config"]))
    assert one.is_single_file and two.is_single_file and two.config == "s3://models/sd-config"
    assert not is_single_file("s3://models/sd15") and is_single_file("/m/model.CKPT")


def test_single_file_flux_checkpoints_are_refused_naming_the_family_and_the_alternative(tmp_path: Path) -> None:
    from darkroom.worker.pipelines import load_pipeline

    # Given a Flux config folder (only its model_index.json is read) and a file beside it
    config = tmp_path / "flux-config"
    config.mkdir()
    (config / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    file = tmp_path / "flux.safetensors"
    file.write_bytes(b"{}")
    # Then the registry refuses the entry (a local config: at start-up) ...
    with pytest.raises(ConfigurationError, match="model 'f': .*flux.safetensors is a single-file flux checkpoint: "
                                                 ".*use a diffusers folder as the source"):
        ModelRegistry().add(ModelSpec("f", str(file), config=str(config)))
    # ... and so does loading (an s3:// config is only known once fetched), before reading the file
    with pytest.raises(ValueError, match="flux.safetensors is a single-file flux checkpoint"):
        load_pipeline(file, CPU, "float32", config=config)
