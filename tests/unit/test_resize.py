"""Resize policies: the working size each mode picks, what each mode does to the pixels,
and refusals at submit that name field, value and rule. Default jobs keep diffusers' behaviour."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from darkroom.common.errors import ErrorCode, InvalidJobError, JobError
from darkroom.common.jobs import ResizeMode, validate_job
from darkroom.worker.images import fit_image, fit_to_job, working_size

BASE = {"model": "tiny", "image": "s3://darkroom/inputs/cat.png", "prompt": "a cat"}
RED, GREEN, BLUE, GRAY = (255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128)


def stripes(width: int, height: int, colors: list[tuple[int, int, int]]) -> Image.Image:
    """Vertical stripes of equal width, left to right."""
    pixels = np.zeros((height, width, 3), np.uint8)
    step = width // len(colors)
    for i, color in enumerate(colors):
        pixels[:, i * step:(i + 1) * step] = color
    return Image.fromarray(pixels)


def colors_in(pixels: np.ndarray) -> set[tuple[int, ...]]:
    return {tuple(int(v) for v in p) for p in pixels.reshape(-1, 3)}


# -- the working size ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "mode", "width", "height", "max_pixels", "expected"),
    [
        ((70, 45), "keep", None, None, None, (70, 45)),              # diffusers rounds it later, to 64x40
        ((70, 45), "crop_resize", None, None, None, (64, 40)),       # no size asked: sides rounded down
        ((4032, 3024), "resize", 512, None, None, (512, 384)),       # height follows the aspect ratio
        ((3024, 4032), "resize_fill", None, 512, None, (384, 512)),  # width follows the aspect ratio
        ((1000, 333), "resize", 96, None, None, (96, 32)),           # nearest multiple of 8 (31.97 -> 32)
        ((100, 100), "crop_resize", 512, 256, None, (512, 256)),     # both given: exactly, upscaling allowed
        ((4032, 3024), "resize", None, None, 512 * 512, (584, 440)),  # scaled down to <= 262144 pixels
        ((200, 120), "resize", None, None, 10**6, (200, 120)),       # never scaled up
        ((20, 2000), "resize", 8, None, None, (8, 800)),
    ],
)
def test_each_policy_picks_its_working_size(size: tuple[int, int], mode: str, width: int | None, height: int | None,
                                            max_pixels: int | None, expected: tuple[int, int]) -> None:
    assert working_size(size, mode, width, height, max_pixels) == expected


@given(st.integers(8, 5000), st.integers(8, 5000), st.integers(64, 4096 * 4096))
def test_max_pixels_is_never_exceeded_and_sides_are_multiples_of_8(w: int, h: int, max_pixels: int) -> None:
    out_w, out_h = working_size((w, h), ResizeMode.RESIZE, max_pixels=max_pixels)
    assert out_w % 8 == 0 and out_h % 8 == 0 and out_w >= 8 and out_h >= 8
    assert out_w * out_h <= max(max_pixels, 64) or (out_w, out_h) == (8, 8)
    assert out_w <= w or out_w == 8
    assert out_h <= h or out_h == 8


@given(st.integers(16, 5000), st.integers(16, 5000), st.integers(1, 512))
def test_one_side_keeps_the_aspect_ratio_within_rounding(w: int, h: int, eighths: int) -> None:
    width = eighths * 8
    _, height = working_size((w, h), "resize", width)
    assert height % 8 == 0
    assert abs(height - h * width / w) <= 4 or height == 8


# -- what each mode does to the pixels --------------------------------------------------------------------
def test_keep_returns_the_decoded_image_untouched() -> None:
    image = stripes(70, 45, [RED])
    assert fit_image(image, "keep") is image


def test_a_default_job_keeps_todays_behaviour() -> None:
    job = validate_job(BASE)
    assert (job.resize_mode, job.width, job.height, job.max_pixels) == (ResizeMode.KEEP, None, None, None)
    image = stripes(70, 45, [RED])
    assert fit_to_job(image, job, limit=10**6) is image


def test_resize_stretches_without_cropping() -> None:
    # Given red | green | blue stripes, 3:1
    out = np.asarray(fit_image(stripes(192, 64, [RED, GREEN, BLUE]), "resize", 64, 64))
    # Then all three survive, squeezed into thirds of a square
    assert out.shape == (64, 64, 3)
    assert colors_in(out[:, 2:18]) == {RED} and colors_in(out[:, 26:38]) == {GREEN} and colors_in(out[:, 46:62]) == {BLUE}


def test_crop_resize_covers_the_target_and_crops_around_the_center() -> None:
    out = np.asarray(fit_image(stripes(192, 64, [RED, GREEN, BLUE]), "crop_resize", 64, 64))
    assert out.shape == (64, 64, 3) and colors_in(out) == {GREEN}  # the side stripes were cropped away


def test_resize_fill_fits_inside_and_fills_the_bands_with_stretched_edges() -> None:
    # Given a 2:1 gray image whose top row is red and bottom row blue
    pixels = np.full((32, 64, 3), GRAY, np.uint8)
    pixels[0], pixels[-1] = RED, BLUE
    out = np.asarray(fit_image(Image.fromarray(pixels), "resize_fill", 64, 64))
    # Then the image sits in the middle, whole, and the bands repeat its edge rows
    assert out.shape == (64, 64, 3)
    assert colors_in(out[:17]) == {RED} and colors_in(out[47:]) == {BLUE}
    assert np.array_equal(out[16:48], pixels)


def test_modes_equal_diffusers_own_resize() -> None:
    from diffusers.image_processor import VaeImageProcessor

    image = Image.effect_noise((90, 50), 60).convert("RGB")
    processor = VaeImageProcessor(vae_scale_factor=8)
    for mode, name in [("resize", "default"), ("crop_resize", "crop"), ("resize_fill", "fill")]:
        ours = fit_image(image, mode, 64, 48)
        theirs = processor.resize(image, height=48, width=64, resize_mode=name)
        assert ours.tobytes() == theirs.tobytes(), mode


def test_a_working_size_above_the_workers_limit_fails_the_job() -> None:
    with pytest.raises(JobError) as info:
        fit_image(stripes(64, 64, [RED]), "resize", 512, 512, limit=200_000)
    assert info.value.code is ErrorCode.INVALID_JOB
    assert "512x512 = 262144 pixels" in info.value.message and "200000" in info.value.message


# -- refusals at submit ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "field", "allowed"),
    [
        ({"resize_mode": "stretch"}, "resize_mode", "one of keep, resize, crop_resize, resize_fill"),
        ({"resize_mode": "resize", "width": 100}, "width", "a multiple of 8, 8 <= width <= 4096"),
        ({"resize_mode": "resize", "height": 0}, "height", "a multiple of 8, 8 <= height <= 4096"),
        ({"resize_mode": "resize", "height": 8192}, "height", "8 <= height <= 4096"),
        ({"width": 512}, "width", "width only with resize_mode resize, crop_resize or resize_fill"),
        ({"max_pixels": 4096}, "max_pixels", "max_pixels only with resize_mode"),
        ({"resize_mode": "crop_resize", "width": 512, "max_pixels": 4096}, "max_pixels",
         "max_pixels only without width and height"),
        ({"resize_mode": "resize", "max_pixels": 10}, "max_pixels", "64 <= max_pixels <= 16777216"),
    ],
)
def test_a_bad_resize_value_is_refused_with_field_value_and_rule(fields: dict[str, object], field: str,
                                                                 allowed: str) -> None:
    with pytest.raises(InvalidJobError) as info:
        validate_job({**BASE, **fields})
    errors = info.value.errors
    assert [e.field for e in errors] == [field]
    assert allowed in (errors[0].allowed or "")
    assert f"{field}={fields[field]!r}" in str(info.value)
