"""Decoding input images safely, fitting them to the job's working size, and encoding output images."""

from __future__ import annotations

import functools
import io
import math
import re
import warnings
from typing import TYPE_CHECKING, Any

from darkroom.common.errors import ErrorCode, JobError
from darkroom.common.jobs import Img2ImgJob, OutputFormat, ResizeMode

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = ["decode_image", "encode_image", "encode_latents", "fit_image", "fit_to_job", "working_size", "MIN_SIDE",
           "INPUT_FORMATS"]

MIN_SIDE = 8
INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
"""The only decoders Pillow may use for an input (never EPS, PSD, ... : their parsers are attack surface)."""
_HIGH_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_ADDRESS = re.compile(r"<([^<>]*?) at 0x[0-9a-fA-F]+>")


def decode_image(data: bytes, *, max_pixels: int) -> Image:
    """Decode bytes into an RGB image, refusing bombs, truncation and odd sizes with a job error.

    Only :data:`INPUT_FORMATS` are opened. The pixel count is checked from the header before any
    pixel is decoded. EXIF orientation is applied; palette, grayscale and alpha images become RGB
    (alpha composited on white); 16-bit and float images are scaled to 8 bits (their full range:
    0..65535 or 0.0..1.0) or refused with ``input_unreadable``.
    """
    from PIL import Image as PILImage
    from PIL import ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            opened = PILImage.open(io.BytesIO(data), formats=INPUT_FORMATS)
        width, height = opened.size
        if width * height > max_pixels:
            raise JobError(
                ErrorCode.INPUT_TOO_LARGE,
                f"input image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} pixels. "
                "Resize it before submitting.",
            )
        if min(width, height) < MIN_SIDE:
            raise JobError(ErrorCode.INPUT_UNSUPPORTED, f"input image is {width}x{height}; both sides must be >= {MIN_SIDE}")
        image = ImageOps.exif_transpose(opened)
        image.load()
        return _to_rgb(image)
    except JobError:
        raise
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as exc:
        raise JobError(ErrorCode.INPUT_TOO_LARGE,
                       f"input image refused as a decompression bomb: {_describe(exc)}") from None
    except UnidentifiedImageError:
        raise JobError(ErrorCode.INPUT_UNREADABLE, "input is not a readable image in an accepted format; accepted: "
                                                   + ", ".join(INPUT_FORMATS)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise JobError(ErrorCode.INPUT_UNREADABLE, f"input image is corrupt or truncated: {_describe(exc)}") from None


def _describe(exc: BaseException) -> str:
    """An exception's message without Python object addresses (``<_io.BytesIO object at 0x7f..>``)."""
    return _ADDRESS.sub(r"<\1>", str(exc))


def _to_eight_bits(image: Image) -> Image:
    """A 16-bit, 32-bit integer or float grayscale image as 8-bit ``L``, its full range kept: integers
    0..65535 (``I;16``, and ``I`` as Pillow opens 16-bit files) and floats 0.0..1.0. Other ranges are
    refused (``input_unreadable``): guessing them would clip or flatten the image."""
    import numpy as np
    from PIL import Image as PILImage

    values = np.asarray(image)
    if image.mode == "F":
        if not np.isfinite(values).all() or values.min() < 0.0 or values.max() > 1.0:
            raise JobError(ErrorCode.INPUT_UNREADABLE, "float input images must hold values in 0.0..1.0 "
                                                       "(no NaN or infinity); convert it to 8 or 16 bits")
        scaled = np.rint(values.astype(np.float64) * 255.0)
    else:
        wide = values.astype(np.int64)
        if wide.min() < 0 or wide.max() > 65535:
            raise JobError(ErrorCode.INPUT_UNREADABLE, f"{image.mode} input images must hold values in 0..65535 "
                                                       f"(found {wide.min()}..{wide.max()}); convert it to 8 or 16 bits")
        scaled = (wide * 255 + 32767) // 65535  # rounded: 65535 -> 255, 257 -> 1
    return PILImage.fromarray(scaled.astype(np.uint8))  # 2-D uint8: mode L


def _to_rgb(image: Image) -> Image:
    from PIL import Image as PILImage

    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_BIT:
        return _to_eight_bits(image).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in {"RGBA", "LA", "PA"}:
        background = PILImage.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    try:
        return image.convert("RGB")
    except (ValueError, OSError):
        raise JobError(ErrorCode.INPUT_UNSUPPORTED, f"image mode {image.mode!r} cannot be converted to RGB") from None


def working_size(size: tuple[int, int], mode: ResizeMode | str, width: int | None = None,
                 height: int | None = None, max_pixels: int | None = None, *, multiple: int = 8) -> tuple[int, int]:
    """The (width, height) the pipeline works at, for an input of ``size``.

    ``keep``: the input's own size (diffusers then rounds each side down to a multiple of 8).
    Otherwise: ``width`` and ``height`` as given; one of them alone, the other following the input's
    aspect ratio (nearest multiple of ``multiple``); neither, the input's size, scaled down (never up)
    to at most ``max_pixels`` when given, each side rounded down to a multiple of ``multiple``.
    """
    src_w, src_h = size
    if ResizeMode(mode) is ResizeMode.KEEP:
        return size
    if width and height:
        return width, height
    if width:
        return width, _nearest(src_h * width / src_w, multiple)
    if height:
        return _nearest(src_w * height / src_h, multiple), height
    scale = min(1.0, math.sqrt(max_pixels / (src_w * src_h))) if max_pixels else 1.0
    w, h = _down(src_w * scale, multiple), _down(src_h * scale, multiple)
    while max_pixels and w * h > max_pixels and max(w, h) > multiple:  # float rounding at the boundary
        w, h = (w - multiple, h) if w >= h else (w, h - multiple)
    return w, h


def fit_image(image: Image, mode: ResizeMode | str, width: int | None = None, height: int | None = None,
              max_pixels: int | None = None, *, limit: int | None = None, multiple: int = 8) -> Image:
    """Bring a decoded RGB input to the job's working size with diffusers' own resize modes.

    ``resize`` stretches to the size; ``crop_resize`` scales to cover it and crops the overflow
    around the center; ``resize_fill`` scales to fit inside it and fills the bands on both sides
    with the image's stretched edge rows (or columns). All resample with Lanczos, as diffusers'
    ``VaeImageProcessor.resize`` does (it is what runs here). ``keep`` returns ``image`` untouched.
    A working size above ``limit`` pixels fails the job (``invalid_job``).
    """
    mode = ResizeMode(mode)
    if mode is ResizeMode.KEEP:
        return image
    w, h = working_size(image.size, mode, width, height, max_pixels, multiple=multiple)
    if limit is not None and w * h > limit:
        raise JobError(ErrorCode.INVALID_JOB,
                       f"resize_mode {mode.value} to {w}x{h} = {w * h} pixels is above this worker's limit of "
                       f"{limit} pixels (DARKROOM_MAX_IMAGE_PIXELS); ask for a smaller width/height or set max_pixels")
    resized: Image = _processor(multiple).resize(image, height=h, width=w, resize_mode=_DIFFUSERS_MODE[mode])
    return resized


def fit_to_job(image: Image, job: Img2ImgJob, *, limit: int | None = None) -> Image:
    """:func:`fit_image` with the job's ``resize_mode``, ``width``, ``height`` and ``max_pixels``."""
    return fit_image(image, job.resize_mode, job.width, job.height, job.max_pixels, limit=limit)


_DIFFUSERS_MODE = {ResizeMode.RESIZE: "default", ResizeMode.CROP_RESIZE: "crop", ResizeMode.RESIZE_FILL: "fill"}


@functools.cache
def _processor(multiple: int) -> Any:
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor(vae_scale_factor=multiple)  # the img2img pipeline's own defaults (Lanczos)


def _nearest(value: float, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


def _down(value: float, multiple: int) -> int:
    return max(multiple, int(value) // multiple * multiple)


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


def latent_placeholder(latents: Any, scale: int = 8) -> Image:
    """A blank image of the size ``latents`` stand for (SD-style VAEs: 8 pixels a cell), where the worker
    wants a picture's size for a job whose input is latents (batching, records)."""
    from PIL import Image as PILImage

    return PILImage.new("RGB", (int(latents.shape[3]) * scale, int(latents.shape[2]) * scale))


def decode_latents_file(data: bytes) -> Any:
    """The latents tensor ``[1, C, h, w]`` of a file :func:`encode_latents` wrote (``input_unreadable`` else)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
    except (SafetensorError, ValueError, OSError) as exc:
        raise JobError(ErrorCode.INPUT_UNREADABLE, f"not a latents file: {str(exc)[:200]}") from None
    latents = tensors.get("latents")
    if latents is None or latents.dim() != 4 or latents.shape[0] != 1:
        raise JobError(ErrorCode.INPUT_UNREADABLE, "a latents file holds one tensor 'latents' of shape [1, C, h, w]")
    return latents.float()


def encode_latents(latents: Any, seed: int) -> bytes:
    """One image's final latents ``[1, 4, h/8, w/8]`` as safetensors (tensor ``latents``, float32)."""
    from safetensors.torch import save

    return save({"latents": latents.float().contiguous()}, metadata={"seed": str(seed), "format": "darkroom-latents-1"})
