"""Input decoding: only the allowed formats are opened, high-bit images keep their tones (or are refused
with a code), and no message carries a Python object address."""

from __future__ import annotations

import io
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from darkroom.common.errors import ErrorCode, JobError
from darkroom.worker.images import INPUT_FORMATS, decode_image

LIMIT = 4096 * 4096
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def refusal(data: bytes) -> JobError:
    with pytest.raises(JobError) as refused:
        decode_image(data, max_pixels=LIMIT)
    assert not _ADDRESS.search(refused.value.message), refused.value.message
    return refused.value


def gradient16(width: int = 64, height: int = 16) -> np.ndarray:
    return np.tile(np.linspace(0, 65535, width).round().astype(np.uint16), (height, 1))


def png_rgb16(values: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one), rows unfiltered."""
    height, width, _ = values.shape
    raw = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def first_row(data: bytes) -> np.ndarray:
    return np.asarray(decode_image(data, max_pixels=LIMIT))[0, :, 0].astype(int)


# -- high-bit images -----------------------------------------------------------------------
def test_a_16_bit_gray_gradient_keeps_its_gradient() -> None:
    row = first_row(encoded(Image.fromarray(gradient16()), "PNG"))  # Pillow opens it as I;16
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) >= 0) and len(set(row.tolist())) > 50  # not clipped to white
    expected = np.rint(np.linspace(0, 65535, 64).round() * 255 / 65535)
    assert np.abs(row - expected).max() <= 1


def test_a_16_bit_rgb_gradient_keeps_its_gradient() -> None:
    row = first_row(png_rgb16(np.stack([gradient16()] * 3, axis=-1)))
    assert row[0] == 0 and row[-1] == 255 and np.all(np.diff(row) >= 0) and len(set(row.tolist())) > 50


def test_32_bit_integer_and_float_tiffs_are_scaled_from_their_full_range() -> None:
    as_int = first_row(encoded(Image.fromarray(gradient16().astype(np.int32)), "TIFF"))
    ramp = np.tile(np.linspace(0.0, 1.0, 64, dtype=np.float32), (16, 1))
    as_float = first_row(encoded(Image.fromarray(ramp), "TIFF"))
    for row in (as_int, as_float):
        assert row[0] == 0 and row[-1] == 255 and np.all(np.diff(row) >= 0) and len(set(row.tolist())) > 50


@pytest.mark.parametrize(("values", "says"), [
    (np.full((16, 16), 2.5, dtype=np.float32), "0.0..1.0"),
    (np.full((16, 16), np.nan, dtype=np.float32), "0.0..1.0"),
    (np.full((16, 16), -1.0, dtype=np.float32), "0.0..1.0"),
    (np.full((16, 16), 70000, dtype=np.int32), "0..65535"),
    (np.full((16, 16), -5, dtype=np.int32), "0..65535"),
])
def test_high_bit_values_outside_the_known_range_are_refused(values: np.ndarray, says: str) -> None:
    error = refusal(encoded(Image.fromarray(values), "TIFF"))
    assert error.code is ErrorCode.INPUT_UNREADABLE and says in error.message


# -- the format allowlist ------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_each_allowed_format_decodes(fmt: str) -> None:
    assert fmt in INPUT_FORMATS
    image = decode_image(encoded(Image.new("RGB", (32, 16), (200, 30, 30)), fmt), max_pixels=LIMIT)
    assert image.mode == "RGB" and image.size == (32, 16)


@pytest.mark.parametrize("data", [
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\nshowpage\n",
    encoded(Image.new("RGB", (16, 16)), "ICO"),
    encoded(Image.new("RGB", (16, 16)), "PPM"),
    encoded(Image.new("RGB", (16, 16)), "TGA"),
    b"definitely not a picture",
])
def test_other_formats_are_refused_unopened_without_an_object_address(data: bytes) -> None:
    error = refusal(data)
    assert error.code is ErrorCode.INPUT_UNREADABLE
    assert "PNG, JPEG, WEBP, GIF, BMP, TIFF" in error.message


def test_a_truncated_image_says_so_without_an_object_address() -> None:
    error = refusal(encoded(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")[:60])
    assert error.code is ErrorCode.INPUT_UNREADABLE
