"""Decoding input images safely and encoding output images."""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

from darkroom.common.errors import ErrorCode, JobError
from darkroom.common.jobs import OutputFormat

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = ["decode_image", "encode_image", "MIN_SIDE"]

MIN_SIDE = 8


def decode_image(data: bytes, *, max_pixels: int) -> Image:
    """Decode bytes into an RGB image, refusing bombs, truncation and odd sizes with a job error.

    The pixel count is checked from the header before any pixel is decoded.
    EXIF orientation is applied; palette, grayscale and alpha images become RGB
    (alpha composited on white).
    """
    from PIL import Image as PILImage
    from PIL import ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            image = PILImage.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise JobError(
                ErrorCode.INPUT_TOO_LARGE,
                f"input image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} pixels. "
                "Resize it before submitting.",
            )
        if min(width, height) < MIN_SIDE:
            raise JobError(ErrorCode.INPUT_UNSUPPORTED, f"input image is {width}x{height}; both sides must be >= {MIN_SIDE}")
        image = ImageOps.exif_transpose(image)
        image.load()
        return _to_rgb(image)
    except JobError:
        raise
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as exc:
        raise JobError(ErrorCode.INPUT_TOO_LARGE, f"input image refused as a decompression bomb: {exc}") from None
    except UnidentifiedImageError as exc:
        raise JobError(ErrorCode.INPUT_UNREADABLE, f"input is not a readable image: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise JobError(ErrorCode.INPUT_UNREADABLE, f"input image is corrupt or truncated: {exc}") from None


def _to_rgb(image: Image) -> Image:
    from PIL import Image as PILImage

    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in {"RGBA", "LA", "PA"}:
        background = PILImage.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise JobError(ErrorCode.INPUT_UNSUPPORTED, f"image mode {image.mode!r} cannot be converted to RGB") from exc


def encode_image(image: Image, fmt: OutputFormat, quality: int = 95) -> bytes:
    """Encode an output image; PNG is lossless so outputs compare pixel for pixel."""
    buffer = io.BytesIO()
    if fmt is OutputFormat.PNG:
        image.save(buffer, format="PNG")
    elif fmt is OutputFormat.JPEG:
        image.save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format="WEBP", quality=quality)
    return buffer.getvalue()
