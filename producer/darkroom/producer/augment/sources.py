"""The source images of a run and the identity of each (S3 VersionId or ETag), which goes into job ids.

Three kinds of ``sources``:

- ``s3://bucket/prefix/``: every image under it (one listing; identity = the listed ETag);
- a local folder: every image under it, uploaded to the run's inputs prefix before the jobs are sent
  (identity = the MD5 of the file, which is the ETag a single-part upload gets, so a dry run computes the
  same job ids as the real run, and a rerun skips files already uploaded);
- a manifest (``.jsonl``, ``.csv`` or ``.parquet``, local or ``s3://``): one row per source with an
  ``image`` column (``s3://`` URI, or a path relative to the manifest that stays inside its folder: an
  absolute path, ``..`` out of it or a symbolic link leading out is refused) and any other columns: job fields
  for that row (``prompt``, ``negative_prompt``, ``num_inference_steps`` ...) and template variables.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from darkroom.common.errors import FieldError, ObjectNotFoundError
from darkroom.common.objectstore import ObjectStore
from darkroom.common.storage import S3Uri

from .spec import InvalidSpecError

__all__ = ["IMAGE_SUFFIXES", "MANIFEST_SUFFIXES", "Source", "list_sources", "upload_sources"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MANIFEST_SUFFIXES = frozenset({".jsonl", ".csv", ".parquet"})
_THREADS = 16
_CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}


@dataclass(frozen=True)
class Source:
    """One source image: the URI jobs read, its identity, its name under the source root and its manifest row."""

    uri: str
    identity: str
    name: str
    row: Mapping[str, Any] = field(default_factory=dict)
    local_path: Path | None = None  # uploaded to ``uri`` before the jobs are sent

    @property
    def variables(self) -> dict[str, Any]:
        """What prompt templates may use: ``{name}``, ``{stem}`` and the manifest's columns."""
        return {"name": self.name, "stem": PurePosixPath(self.name).stem, **self.row}


def list_sources(sources: str, upload_prefix: str, store: ObjectStore) -> list[Source]:
    """The run's sources, in a stable order (key order, or the manifest's row order)."""
    suffix = PurePosixPath(sources).suffix.lower()
    if suffix in MANIFEST_SUFFIXES:
        found = _from_manifest(sources, upload_prefix, store)
    elif sources.startswith("s3://"):
        found = _from_prefix(S3Uri.parse(sources, allow_empty_key=True), store)
    else:
        found = _from_folder(Path(sources), upload_prefix)
    if not found:
        raise InvalidSpecError([FieldError("sources", sources, "holds no images",
                                          "image files (" + ", ".join(sorted(IMAGE_SUFFIXES)) + ")")])
    return found


def upload_sources(sources: Iterable[Source], store: ObjectStore, upload_prefix: str) -> int:
    """Upload the local sources whose object is missing or differs; return how many were uploaded."""
    local = [s for s in sources if s.local_path is not None]
    if not local:
        return 0
    present = {str(o.uri): o.etag for o in store.list_objects(_as_folder(S3Uri.parse(upload_prefix,
                                                                                      allow_empty_key=True)))}
    missing = [s for s in local if present.get(s.uri) != s.identity]

    def put(source: Source) -> None:
        assert source.local_path is not None
        store.put_bytes(S3Uri.parse(source.uri), source.local_path.read_bytes(),
                        content_type=_CONTENT_TYPES.get(source.local_path.suffix.lower(), "application/octet-stream"))

    with ThreadPoolExecutor(_THREADS) as pool:
        list(pool.map(put, missing))
    return len(missing)


# -- the three kinds -------------------------------------------------------------
def _from_prefix(prefix: S3Uri, store: ObjectStore) -> list[Source]:
    root = _as_folder(prefix)
    return [Source(str(o.uri), o.etag, o.uri.key[len(root.key):], {})
            for o in store.list_objects(root)
            if _is_image(o.uri.key) and "/_augment/" not in "/" + o.uri.key[len(root.key):]]


def _from_folder(folder: Path, upload_prefix: str) -> list[Source]:
    if not folder.is_dir():
        raise InvalidSpecError([FieldError("sources", str(folder), "is not a folder, an s3:// prefix or a manifest",
                                          "s3://bucket/prefix/, a local folder, or a .jsonl/.csv/.parquet file")])
    files = sorted(p for p in folder.rglob("*") if p.is_file() and _is_image(p.name))
    target = S3Uri.parse(upload_prefix, allow_empty_key=True)
    with ThreadPoolExecutor(_THREADS) as pool:
        digests = list(pool.map(_md5, files))
    return [Source(str(target.join(p.relative_to(folder).as_posix())), digest, p.relative_to(folder).as_posix(), {},
                   p) for p, digest in zip(files, digests, strict=True)]


def _from_manifest(location: str, upload_prefix: str, store: ObjectStore) -> list[Source]:
    rows = _read_rows(location, store)
    errors = [FieldError(f"sources[{i}].image", row.get("image"), "missing", "an s3:// URI or a path relative "
                         "to the manifest") for i, row in enumerate(rows) if not isinstance(row.get("image"), str)
              or not row["image"]]
    if errors:
        raise InvalidSpecError(errors[:20])
    with ThreadPoolExecutor(_THREADS) as pool:
        return list(pool.map(lambda ir: _manifest_source(ir[0], ir[1], location, upload_prefix, store),
                             enumerate(rows)))


def _manifest_source(index: int, row: dict[str, Any], location: str, upload_prefix: str,
                     store: ObjectStore) -> Source:
    image = str(row["image"])
    columns = {k: v for k, v in row.items() if k != "image"}
    if image.startswith("s3://") or location.startswith("s3://"):
        try:
            uri = image if image.startswith("s3://") else str(_parent(S3Uri.parse(location)).join(_relative(image)))
            head = store.head(S3Uri.parse(uri))
        except (ObjectNotFoundError, ValueError) as exc:
            raise InvalidSpecError([FieldError(f"sources[{index}].image", image, str(exc), "an existing object")]) \
                from None
        identity = str(head.get("VersionId") or str(head.get("ETag", "")).strip('"'))
        return Source(uri, identity, PurePosixPath(S3Uri.parse(uri).key).name, columns)
    base = Path(location).resolve().parent
    path = (base / image).resolve()
    if not path.is_relative_to(base) or path == base:
        raise InvalidSpecError([FieldError(f"sources[{index}].image", image, f"lies outside the manifest's folder "
                                           f"{base}", _INSIDE)])
    if not path.is_file():
        raise InvalidSpecError([FieldError(f"sources[{index}].image", image, f"no such file: {path}", _INSIDE)])
    name = path.relative_to(base).as_posix()
    digest = _md5(path)
    target = S3Uri.parse(upload_prefix, allow_empty_key=True)
    return Source(str(target.join(name)), digest, name, columns, path)


_INSIDE = "an s3:// URI, or a path relative to the manifest's folder that stays inside it (no absolute path, no '..')"


def _relative(image: str) -> str:
    """A manifest's relative ``image`` beside an ``s3://`` manifest: no leading '/' (it would be dropped)."""
    if image.startswith("/"):
        raise ValueError(f"{image!r} is absolute; name it relative to the manifest, or as an s3:// URI")
    return image


def _read_rows(location: str, store: ObjectStore) -> list[dict[str, Any]]:
    data = store.get_bytes(S3Uri.parse(location)) if location.startswith("s3://") else Path(location).read_bytes()
    suffix = PurePosixPath(location).suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise InvalidSpecError([FieldError("sources", location, "reading Parquet needs pyarrow",
                                              "pip install 'darkroom-producer[augment]'")]) from None
        return [dict(r) for r in pq.read_table(io.BytesIO(data)).to_pylist()]
    text = data.decode("utf-8-sig")
    if suffix == ".csv":
        return [{k: v for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(io.StringIO(text))]
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidSpecError([FieldError("sources", f"{location}:{number}", f"not JSON: {exc}",
                                                  "one JSON object per line")]) from None
            if not isinstance(row, dict):
                raise InvalidSpecError([FieldError("sources", f"{location}:{number}", "not a JSON object",
                                                  "one JSON object per line")])
            rows.append({k: v for k, v in row.items() if v is not None})
    return rows


# -- helpers -------------------------------------------------------------------
def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def _as_folder(prefix: S3Uri) -> S3Uri:
    """``s3://b/photos`` -> ``s3://b/photos/`` (so photos2/ is not listed with it)."""
    return prefix if not prefix.key or prefix.key.endswith("/") else S3Uri(prefix.bucket, prefix.key + "/")


def _parent(uri: S3Uri) -> S3Uri:
    return S3Uri(uri.bucket, uri.key.rpartition("/")[0])


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
