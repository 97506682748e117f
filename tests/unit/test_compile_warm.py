"""A compiled worker's warm start: the denoiser's batch dimension is dynamic from the first trace
(darkroom.worker.dynamic_batch), and a passed compiler probe is remembered in the compile cache folder
(darkroom.worker.compile_cache.probe_marker, darkroom.worker.tuning._compiler_problems)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from darkroom.worker import tuning as tuning_module
from darkroom.worker.compile_cache import CACHE_ENV, compiler_identity, probe_marker
from darkroom.worker.device import DeviceInfo
from darkroom.worker.dynamic_batch import batch_tensors, compile_dynamic_batch, mark_batch_dynamic

CPU = DeviceInfo("cpu", "float32", "cpu")


class Denoiser(torch.nn.Module):
    """Shaped like a UNet call: a batch of latents, a 0-d timestep, batch-sized conditioning in a kwarg."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(6, 4)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                added_cond_kwargs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        extra = added_cond_kwargs["text_embeds"].sum(-1)[:, None] if added_cond_kwargs else 0
        out: torch.Tensor = sample * timestep + self.proj(encoder_hidden_states).mean(1) + extra
        return out


def call(batch: int) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
    generator = torch.Generator().manual_seed(batch)
    return ((torch.randn(batch, 4, generator=generator), torch.tensor(3.0)),
            {"encoder_hidden_states": torch.randn(batch, 5, 6, generator=generator),
             "added_cond_kwargs": {"text_embeds": torch.randn(batch, 7, generator=generator)}})


# -- which tensors carry the batch ------------------------------------------------------------------------
def test_batch_tensors_are_those_sized_like_the_first_tensor_argument_dicts_included() -> None:
    args, kwargs = call(2)
    kwargs["unrelated"] = torch.ones(3, 2)  # first dimension is not the batch
    found = batch_tensors(args, kwargs)
    assert [tuple(t.shape) for t in found] == [(2, 4), (2, 5, 6), (2, 7)]  # the 0-d timestep is not one


def test_a_call_without_tensors_has_no_batch() -> None:
    assert batch_tensors((1, "x"), {"scale": 0.5, "timestep": torch.tensor(1.0)}) == []


def test_marking_flags_dimension_0_of_each_batch_tensor_only() -> None:
    args, kwargs = call(2)
    assert mark_batch_dynamic(args, kwargs) == 3
    assert args[0]._dynamo_weak_dynamic_indices == {0}  # type: ignore[attr-defined]
    assert kwargs["added_cond_kwargs"]["text_embeds"]._dynamo_weak_dynamic_indices == {0}
    assert not hasattr(args[1], "_dynamo_weak_dynamic_indices")


# -- one trace for every batch size ----------------------------------------------------------------------
@pytest.fixture(autouse=True)
def fresh_dynamo() -> Any:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_the_first_trace_serves_every_later_batch_size_with_the_same_outputs() -> None:
    module, counter = Denoiser(), CompileCounter()
    eager = [module(*call(b)[0], **call(b)[1]) for b in (2, 4, 3, 8)]
    assert compile_dynamic_batch(module, backend=counter)
    compiled = [module(*call(b)[0], **call(b)[1]) for b in (2, 4, 3, 8)]
    assert counter.frame_count == 1
    for got, expected in zip(compiled, eager, strict=True):
        assert torch.equal(got, expected)


def test_without_the_marks_dynamo_traces_a_second_time() -> None:
    # the behaviour compile_dynamic_batch removes (so the test above can fail)
    module, counter = Denoiser(), CompileCounter()
    module.compile(backend=counter)
    for batch in (2, 4, 3):
        module(*call(batch)[0], **call(batch)[1])
    assert counter.frame_count == 2


def test_batch_1_stays_specialized_and_batch_2_then_traces_the_dynamic_graph() -> None:
    module, counter = Denoiser(), CompileCounter()
    compile_dynamic_batch(module, backend=counter)
    for batch in (1, 2, 5):
        module(*call(batch)[0], **call(batch)[1])
    assert counter.frame_count == 2


def test_the_compiled_module_keeps_its_class_and_reads_as_compiled() -> None:
    from darkroom.worker.mixing import _compiled

    module = Denoiser()
    compile_dynamic_batch(module, backend=CompileCounter())
    assert type(module) is Denoiser and _compiled(module)


# -- the compiler probe, remembered ------------------------------------------------------------------------
def fake_compiler(folder: Path, name: str = "g++") -> Path:
    path = folder / name
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_no_marker_without_a_compile_cache_folder() -> None:
    assert probe_marker("cpu", "2.13.0", {"PATH": os.defpath}) is None


def test_the_marker_lives_in_the_cache_folder_and_depends_on_torch_device_and_compiler(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_compiler(bin_dir)
    clang = fake_compiler(bin_dir, "clang++")
    env = {CACHE_ENV: str(tmp_path / "cache"), "PATH": str(bin_dir)}
    marker = probe_marker("cpu", "2.13.0", env)
    assert marker is not None and marker.parent == tmp_path / "cache"
    assert probe_marker("cpu", "2.13.0", dict(env)) == marker  # stable
    others = {probe_marker("cpu", "2.14.0", env), probe_marker("cuda:0", "2.13.0", env),
              probe_marker("cpu", "2.13.0", {**env, "CXX": "clang++"}),
              probe_marker("cpu", "2.13.0", {**env, "CXX": "/nonexistent/g++"})}
    assert marker not in others and len(others) == 4
    os.utime(clang, ns=(0, 0))  # the same compiler file, changed (an upgrade in place)
    assert probe_marker("cpu", "2.13.0", {**env, "CXX": "clang++"}) not in {marker, *others}


def test_a_missing_compiler_is_named_as_missing(tmp_path: Path) -> None:
    assert compiler_identity("cpu", "2.13.0", {"PATH": str(tmp_path), "CXX": "g++"}).endswith("g++: missing")


def test_a_passed_probe_is_remembered_and_then_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    runs: list[str] = []
    monkeypatch.setattr(tuning_module, "_run_compiler_probe", lambda device: runs.append(device.device) or [])
    assert tuning_module._compiler_problems(CPU) == []
    marker = probe_marker("cpu", torch.__version__)
    assert marker is not None and marker.is_file() and runs == ["cpu"]
    assert tuning_module._compiler_problems(CPU) == []
    assert runs == ["cpu"]  # the second start skipped the probe


def test_a_failed_probe_is_not_remembered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(tuning_module, "_run_compiler_probe", lambda device: ["DARKROOM_COMPILE=true: no compiler"])
    assert tuning_module._compiler_problems(CPU) == ["DARKROOM_COMPILE=true: no compiler"]
    assert tuning_module._compiler_problems(CPU) == ["DARKROOM_COMPILE=true: no compiler"]
    assert list(tmp_path.iterdir()) == []


def test_without_a_cache_folder_the_probe_runs_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    runs: list[str] = []
    monkeypatch.setattr(tuning_module, "_run_compiler_probe", lambda device: runs.append(device.device) or [])
    tuning_module._compiler_problems(CPU)
    tuning_module._compiler_problems(CPU)
    assert runs == ["cpu", "cpu"]
