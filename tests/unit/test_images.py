"""Input decoding refuses what would hurt a worker, with a job error code; outputs encode losslessly."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from darkroom.common.errors import ErrorCode, JobError
from darkroom.common.jobs import OutputFormat
from darkroom.worker.images import decode_image, encode_image


def encoded(image: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def code_of(data: bytes, max_pixels: int = 10_000_000) -> ErrorCode:
    with pytest.raises(JobError) as info:
        decode_image(data, max_pixels=max_pixels)
    return info.value.code


def test_truncated_png_is_unreadable() -> None:
    data = encoded(Image.new("RGB", (64, 64), (10, 20, 30)))
    assert code_of(data[: len(data) // 2]) is ErrorCode.INPUT_UNREADABLE


def test_non_image_is_unreadable() -> None:
    assert code_of(b"%PDF-1.4 not an image") is ErrorCode.INPUT_UNREADABLE


def test_pixel_limit_is_checked_before_decoding() -> None:
    assert code_of(encoded(Image.new("RGB", (200, 100))), max_pixels=19_999) is ErrorCode.INPUT_TOO_LARGE


def test_decompression_bomb_is_refused() -> None:
    # a 12k x 12k black PNG compresses to a few hundred KB but is 144 M pixels
    bomb = encoded(Image.new("1", (12_000, 12_000)))
    assert len(bomb) < 1_000_000
    assert code_of(bomb, max_pixels=2048 * 2048) is ErrorCode.INPUT_TOO_LARGE


def test_tiny_images_are_unsupported() -> None:
    assert code_of(encoded(Image.new("RGB", (4, 64)))) is ErrorCode.INPUT_UNSUPPORTED


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "I;16"])
def test_modes_become_rgb(mode: str) -> None:
    image = Image.new(mode, (16, 16))
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    assert decode_image(encoded(image, fmt), max_pixels=10_000).mode == "RGB"


def test_transparency_is_composited_on_white() -> None:
    out = decode_image(encoded(Image.new("RGBA", (16, 16), (0, 0, 0, 0))), max_pixels=10_000)
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = decode_image(encoded(image, "JPEG", exif=exif.tobytes()), max_pixels=10_000)
    assert out.size == (20, 40)


def test_png_output_is_lossless() -> None:
    image = Image.effect_noise((32, 32), 64).convert("RGB")
    assert Image.open(io.BytesIO(encode_image(image, OutputFormat.PNG))).tobytes() == image.tobytes()


@pytest.mark.parametrize("fmt", [OutputFormat.JPEG, OutputFormat.WEBP])
def test_lossy_outputs_decode(fmt: OutputFormat) -> None:
    data = encode_image(Image.new("RGB", (32, 32), (1, 2, 3)), fmt, quality=80)
    assert Image.open(io.BytesIO(data)).format == fmt.name
