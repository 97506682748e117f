"""The simulated engine's profile and cache; the worker end to end is in tests/integration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from darkroom.common.errors import ConfigurationError, ErrorCode, JobError
from darkroom.worker.registry import ModelRegistry, ModelSpec
from darkroom.worker.simulate import Profile, SimulatedDevice, SimulatedModels, simulated_registry

BASE: dict[str, Any] = {"step_seconds": {"64x64": {"1": 0.01, "4": 0.02}, "128x128": {"1": 0.04}},
                        "models": {"a": {"bytes": 600, "load_seconds": 0}, "b": {"bytes": 700, "load_seconds": 0}},
                        "time_scale": 0.001}


def test_step_time_interpolates_in_images_then_in_pixels() -> None:
    profile = Profile.from_dict(BASE)
    assert profile.step_time(1, 64 * 64) == pytest.approx(0.01)
    assert profile.step_time(2, 64 * 64) == pytest.approx(0.01 + 0.01 / 3)
    assert profile.step_time(8, 64 * 64) == pytest.approx(0.02 + 4 * 0.01 / 3)  # the last segment's slope
    middle = (64 * 64 + 128 * 128) // 2
    assert profile.step_time(1, middle) == pytest.approx(0.025, rel=1e-3)
    assert profile.step_time(1, 256 * 256) == pytest.approx(0.04 * 4)  # beyond the largest: in proportion


@pytest.mark.parametrize(("change", "message"), [
    ({"step_seconds": {}}, "at least one resolution"),
    ({"step_seconds": {"64": {"1": 0.1}}}, "WIDTHxHEIGHT"),
    ({"step_seconds": {"64x64": {"0": 0.1}}}, "images >= 1"),
    ({"time_scale": 0}, "0 < time_scale <= 100"),
    ({"models": {"a": {"bytes": 0}}}, "bytes >= 1"),
    ({"gpu": "h100"}, "unknown keys"),
])
def test_bad_profiles_are_refused_with_the_allowed_values(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Profile.from_dict({**BASE, **change})


def test_the_real_lru_policy_evicts_by_the_profiles_bytes(tmp_path: Path) -> None:
    profile = Profile.from_dict(BASE)
    registry = simulated_registry(profile)
    assert registry.ids == ["a", "b"] and registry.get("a").source.startswith("s3://")
    device = SimulatedDevice("sim", "float16", "sim", 1000)
    models = SimulatedModels(registry, device, files=None, profile=profile, budget_bytes=1000)  # type: ignore[arg-type]
    models.get("a")
    assert models.resident == ["a"] and models.resident_bytes() == 600
    models.get("b")  # 600 + 700 > 1000: a leaves first
    assert models.resident == ["b"] and models.evictions == 1 and models.misses == 2
    models.get("b")
    assert models.hits == 1


def test_a_model_larger_than_the_budget_fails_its_jobs() -> None:
    profile = Profile.from_dict({**BASE, "models": {"big": {"bytes": 5000}}})
    registry = ModelRegistry()
    registry.add(ModelSpec("big", "s3://darkroom-sim/models/big/"))
    models = SimulatedModels(registry, SimulatedDevice("sim", "float16", "sim"), files=None,  # type: ignore[arg-type]
                             profile=profile, budget_bytes=1000)
    with pytest.raises(JobError) as failure:
        models.get("big")
    assert failure.value.code == ErrorCode.MODEL_TOO_LARGE
