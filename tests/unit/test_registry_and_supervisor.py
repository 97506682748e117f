from __future__ import annotations

from pathlib import Path

import pytest

from darkroom.common.errors import ConfigurationError, ErrorCode, JobError
from darkroom.worker.cli import _args_without_gpus
from darkroom.worker.registry import ModelRegistry
from darkroom.worker.supervisor import plan_children


def write_model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    return folder


def test_registry_file_with_models_adapters_and_allowlists(tmp_path: Path) -> None:
    write_model(tmp_path / "m1")
    (tmp_path / "style.safetensors").write_bytes(b"x")
    file = tmp_path / "registry.toml"
    file.write_text(
        '[models.one]\nsource = "m1"\ndtype = "float16"\nscheduler = "EulerDiscreteScheduler"\n'
        'adapters = ["style", "s3://loras/ok/"]\n'
        '[models.two]\nsource = "s3://models/two"\n'
        '[adapters.style]\nsource = "style.safetensors"\n'
    )
    registry = ModelRegistry.build(file)
    one = registry.get("one")
    assert one.source == str(tmp_path / "m1") and one.dtype == "float16" and one.scheduler == "EulerDiscreteScheduler"
    assert registry.adapter_source(one, "style") == str(tmp_path / "style.safetensors")
    assert registry.adapter_source(one, "s3://loras/ok/a.safetensors") == "s3://loras/ok/a.safetensors"
    with pytest.raises(JobError) as refused:
        registry.adapter_source(one, "s3://loras/other/a.safetensors")
    assert refused.value.code is ErrorCode.ADAPTER_NOT_ALLOWED
    with pytest.raises(JobError) as unknown:
        registry.adapter_source(one, "nope")
    assert unknown.value.code is ErrorCode.ADAPTER_NOT_FOUND
    assert registry.adapter_source(registry.get("two"), "s3://any/x.safetensors")  # no allowlist: any


def test_unknown_model_is_a_job_error_not_a_crash(tmp_path: Path) -> None:
    registry = ModelRegistry.build(pairs=[f"a={write_model(tmp_path / 'a')}"])
    with pytest.raises(JobError) as info:
        registry.get("b")
    assert info.value.code is ErrorCode.MODEL_NOT_FOUND and "known models: a" in info.value.message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[models.a]\ndtype = "float16"\n', "needs a 'source'"),
        ('[models.a]\nsource = "m"\ncolour = 1\n', "unknown keys"),
        ('[modelz.a]\nsource = "m"\n', "unknown tables"),
        ('[models.a]\nsource = "missing"\n', "not a diffusers model folder"),
        ("not toml [", "cannot read"),
    ],
)
def test_bad_registry_files_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    write_model(tmp_path / "m")
    file = tmp_path / "r.toml"
    file.write_text(text)
    with pytest.raises(ConfigurationError, match=message):
        ModelRegistry.build(file)


def test_single_file_checkpoints_without_a_config_are_refused_with_advice(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="needs a 'config' in the registry file"):
        ModelRegistry.build(pairs=[f"a={tmp_path / 'model.safetensors'}"])


def test_one_child_per_gpu_each_seeing_only_its_device() -> None:
    children = plan_children("all", 2, "box")
    assert [c.name for c in children] == ["box-gpu0", "box-gpu1"]
    assert [c.env["CUDA_VISIBLE_DEVICES"] for c in children] == ["0", "1"]
    assert all(c.env["DARKROOM_DEVICE"] == "cuda:0" for c in children)
    assert [c.gpu for c in plan_children("1", 2, "box")] == [1]


def test_no_gpu_means_one_cpu_worker_and_explicit_gpus_must_exist() -> None:
    assert plan_children("all", 0, "box") == []
    with pytest.raises(ConfigurationError, match="no GPU"):
        plan_children("0,1", 1, "box")
    with pytest.raises(ConfigurationError, match="'all' or GPU indices"):
        plan_children("first", 1, "box")


def test_children_get_the_command_without_gpus_and_name() -> None:
    argv = ["--models-file", "r.toml", "--gpus", "all", "--name=x", "--loglevel", "DEBUG"]
    assert _args_without_gpus(argv) == ["--models-file", "r.toml", "--loglevel", "DEBUG"]
