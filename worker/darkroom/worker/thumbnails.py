"""Small WebP thumbnails of output images, stored beside them for dashboards and galleries.

A thumbnail is made from the *public* image (so it is blurred when the output was blurred) and
never for a blocked output; its key is :func:`darkroom.common.storage.thumbnail_uri`.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from darkroom.common.storage import THUMBNAIL_CONTENT_TYPE

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = ["make_thumbnail", "THUMBNAIL_SIDE", "THUMBNAIL_CONTENT_TYPE"]

THUMBNAIL_SIDE = 256
"""Longest side of a thumbnail in pixels; smaller images keep their size (never enlarged)."""
_QUALITY = 80


def make_thumbnail(image: Image, side: int = THUMBNAIL_SIDE) -> bytes:
    """WebP bytes of ``image`` scaled down to at most ``side`` pixels on its longest side, aspect kept."""
    from PIL import Image as PILImage

    if side < 1:
        raise ValueError(f"a thumbnail side must be at least 1 pixel, not {side}")
    small = image.convert("RGB") if image.mode != "RGB" else image.copy()
    small.thumbnail((side, side), PILImage.Resampling.LANCZOS)
    buffer = io.BytesIO()
    small.save(buffer, format="WEBP", quality=_QUALITY, method=4)
    return buffer.getvalue()
