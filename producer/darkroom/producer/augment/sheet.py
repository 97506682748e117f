"""A contact sheet of a run: one row per source, the source first, then its outputs labelled by what varies.

Needs Pillow (``darkroom-producer[images]``); reads the images from an exported folder (:func:`dataset.export`)
and the sources from object storage.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from darkroom.common.objectstore import ObjectStore
from darkroom.common.storage import S3Uri

__all__ = ["contact_sheet"]

_LABELLED = ("prompt", "strength", "seed", "adapters", "guidance_scale", "num_inference_steps")
_TEXT_HEIGHT = 14


def contact_sheet(rows: Sequence[dict[str, Any]], folder: str | Path, store: ObjectStore, path: str | Path, *,
                  sources: int = 4, per_source: int = 8, tile: int = 96, colors: int = 256) -> Path:
    """Draw up to ``sources`` rows of ``per_source`` outputs (``rows``: metadata.jsonl rows) into ``path``: a PNG
    with a palette of ``colors`` (0: full RGB; a palette keeps a sheet of noisy images small)."""
    import io

    from PIL import Image, ImageDraw

    by_source: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_source.setdefault(row["source_uri"], []).append(row)
    picked = list(by_source.items())[:sources]
    varying = [k for k in _LABELLED if len({str(r.get(k)) for r in rows}) > 1]
    width = max(len(outputs[:per_source]) for _, outputs in picked) + 1
    sheet = Image.new("RGB", (width * (tile + 4) + 4, len(picked) * (tile + _TEXT_HEIGHT + 4) + 4), "white")
    draw = ImageDraw.Draw(sheet)
    for y, (source_uri, outputs) in enumerate(picked):
        top = 4 + y * (tile + _TEXT_HEIGHT + 4)
        source = Image.open(io.BytesIO(store.get_bytes(S3Uri.parse(source_uri)))).convert("RGB")
        tiles = [(source, "source")] + [(Image.open(Path(folder) / r["file_name"]).convert("RGB"), _label(r, varying))
                                        for r in outputs[:per_source]]
        for x, (image, label) in enumerate(tiles):
            left = 4 + x * (tile + 4)
            sheet.paste(image.resize((tile, tile)), (left, top))
            draw.text((left + 1, top + tile + 1), label[: tile // 5], fill="black")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    (sheet.quantize(colors=colors) if colors else sheet).save(target, format="PNG", optimize=True)
    return target


def _label(row: dict[str, Any], varying: list[str]) -> str:
    short = {"prompt": "", "strength": "s", "seed": "#", "adapters": "lora ", "guidance_scale": "g",
             "num_inference_steps": "n"}
    parts = []
    for key in varying:
        value = row.get(key)
        if key == "prompt":  # its last clause's first word: "{stem}, oil painting at night" -> "oil"
            value = (str(value).split(",")[-1].split() or [""])[0][:10]
        parts.append(f"{short[key]}{value}")
    return " ".join(parts)
