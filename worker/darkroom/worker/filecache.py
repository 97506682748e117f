"""A content-addressed local cache of files from object storage, shared by the worker processes of a host.

Layout under ``root``::

    blobs/<sha256>                      every downloaded file, once, named by its content
    files/<sha256>/<name>               a single file (e.g. a LoRA) under its own name (hard link)
    trees/<manifest-sha256>/<path>      a folder (e.g. a diffusers model), hard links into blobs/
    locks/<key>.lock                    flock()ed while one process downloads; the others wait, then reuse

Every download is hashed while it streams. It is verified against the object's
``sha256`` user metadata when present (``darkroom models push`` sets it), else
against its MD5 ETag for single-part uploads. Folders appear by atomic rename,
so a reader never sees half of one.

Boundaries: every local path is resolved and must stay inside its folder (a listing key
``sd//tmp/x/evil.pth`` is refused, never written to ``/tmp/x/evil.pth``); a download may be
capped (``max_bytes``: checked on the object's size, then while it streams); past
``budget_bytes`` of blobs, the least recently used ``files/`` and ``trees/`` entries are
removed, then the blobs nothing links to any more. Entries and blobs used within
``min_age_seconds`` are never evicted (another process may be about to open them).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from darkroom.common.errors import ObjectNotFoundError, ObjectTooLargeError, StorageError
from darkroom.common.objectstore import ObjectStore
from darkroom.common.storage import S3Uri

__all__ = ["FileCache", "ChecksumMismatch", "UnsafeKeyError", "sha256_file", "push_files"]

log = logging.getLogger(__name__)
_CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ChecksumMismatch(StorageError):
    """Raised when a downloaded file does not match its recorded checksum."""


class UnsafeKeyError(StorageError):
    """Raised when an object key would become a local path outside its cache folder."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class FileCache:
    """Downloads ``s3://`` files and folders once per host, verified, bounded and shared."""

    def __init__(self, root: Path, store: ObjectStore, *, budget_bytes: int | None = None,
                 max_adapter_bytes: int | None = None, min_age_seconds: float = 60.0) -> None:
        self.root = root
        self.store = store
        self.budget_bytes = budget_bytes
        self.max_adapter_bytes = max_adapter_bytes  # what callers pass as max_bytes for job-named files
        self.min_age_seconds = min_age_seconds
        for sub in ("blobs", "files", "trees", "locks", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    # -- single files --------------------------------------------------------
    def fetch_file(self, uri: S3Uri, *, max_bytes: int | None = None) -> Path:
        """The local path of ``uri``'s content, downloading it once (at most ``max_bytes``, when given)."""
        head = self.store.head(uri)
        _check_size(uri, int(head.get("ContentLength") or 0), max_bytes)
        name = _file_name(uri)
        expected = _expected_sha256(head)
        if expected:
            cached = self.root / "files" / expected / name
            if cached.is_file():
                _touch(cached.parent)
                return cached
        with self._lock(hashlib.sha256(str(uri).encode()).hexdigest()):
            blob = self._download(uri, head, max_bytes)
            target = self.root / "files" / blob.name / name
            if not target.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                _link(blob, target)
            _touch(target.parent)
        self.evict(keep=target.parent)
        return target

    # -- folders ---------------------------------------------------------------
    def fetch_tree(self, uri: S3Uri, *, max_bytes: int | None = None) -> Path:
        """The local copy of every object under the prefix ``uri`` (a folder), downloading each blob once
        (each at most ``max_bytes``, when given). Keys that would land outside the folder are refused."""
        listing = self._list(uri)
        if not listing:
            raise ObjectNotFoundError(f"{uri} holds no objects")
        manifest = json.dumps(sorted((rel, obj["ETag"], obj["Size"]) for rel, obj in listing.items()))
        key = hashlib.sha256(manifest.encode()).hexdigest()
        target = self.root / "trees" / key
        if target.is_dir():
            _touch(target)
            return target
        with self._lock(key):
            if target.is_dir():
                _touch(target)
                return target
            staging = self.root / "tmp" / f"tree-{uuid.uuid4().hex}"
            places = {relative: contained(staging, relative, uri) for relative in listing}  # all, before any I/O
            for relative, obj in listing.items():
                source = S3Uri(uri.bucket, obj["Key"])
                _check_size(source, int(obj.get("Size") or 0), max_bytes)
                blob = self._download(source, self.store.head(source), max_bytes)
                dest = places[relative]
                dest.parent.mkdir(parents=True, exist_ok=True)
                _link(blob, dest)
            staging.rename(target)
            _touch(target)
        self.evict(keep=target)
        return target

    # -- bounds ------------------------------------------------------------------
    def usage_bytes(self) -> int:
        """Bytes of the blobs held (each file once, however many entries link to it)."""
        return sum(_size(p) for p in (self.root / "blobs").iterdir())

    def evict(self, *, keep: Path | None = None) -> int:
        """Past the budget, remove least recently used entries, then unlinked blobs; return bytes freed."""
        if self.budget_bytes is None:
            return 0
        with self._lock("evict"):
            used = before = self.usage_bytes()
            if used <= self.budget_bytes:
                return 0
            now = time.time()
            for entry in self._entries():
                if used <= self.budget_bytes:
                    break
                if entry == keep or now - _mtime(entry) < self.min_age_seconds:
                    continue
                doomed = self.root / "tmp" / f"evict-{uuid.uuid4().hex}"
                entry.rename(doomed)  # gone from its place at once; removed below
                shutil.rmtree(doomed, ignore_errors=True)
                used -= self._drop_unlinked_blobs(now)
            if used > self.budget_bytes:
                log.warning("file cache %s holds %d bytes, above its budget of %d: the rest is in use",
                            self.root, used, self.budget_bytes)
            return before - used

    def _entries(self) -> list[Path]:
        """``files/<sha>`` and ``trees/<key>`` folders, least recently used first."""
        found = [p for sub in ("files", "trees") for p in (self.root / sub).iterdir() if p.is_dir()]
        return sorted(found, key=_mtime)

    def _drop_unlinked_blobs(self, now: float) -> int:
        freed = 0
        for blob in (self.root / "blobs").iterdir():
            try:
                info = blob.stat()
            except FileNotFoundError:
                continue
            if info.st_nlink <= 1 and now - info.st_mtime >= self.min_age_seconds:
                blob.unlink(missing_ok=True)
                freed += info.st_size
        return freed

    # -- internals -------------------------------------------------------------
    def _list(self, uri: S3Uri) -> dict[str, dict[str, Any]]:
        prefix = uri.key.rstrip("/") + "/" if uri.key else ""
        paginator = self.store.client.get_paginator("list_objects_v2")
        found: dict[str, dict[str, Any]] = {}
        try:
            for page in paginator.paginate(Bucket=uri.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    relative = obj["Key"][len(prefix):]
                    if relative and not relative.endswith("/"):  # folder markers hold nothing
                        found[relative] = obj
        except Exception as exc:  # noqa: BLE001 - botocore raises many types
            if "NoSuchBucket" in str(exc):
                raise ObjectNotFoundError(f"{uri}: bucket does not exist") from None
            raise
        return found

    def _download(self, uri: S3Uri, head: dict[str, Any], max_bytes: int | None = None) -> Path:
        """Stream ``uri`` into blobs/<sha256>, verifying it; return the blob path."""
        expected = _expected_sha256(head)
        if expected and (self.root / "blobs" / expected).is_file():
            _touch(self.root / "blobs" / expected)  # recently used: not an eviction candidate
            return self.root / "blobs" / expected
        temp = self.root / "tmp" / f"blob-{uuid.uuid4().hex}"
        sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
        response = self.store.client.get_object(Bucket=uri.bucket, Key=uri.key)
        received = 0
        try:
            with open(temp, "wb") as out:
                for chunk in response["Body"].iter_chunks(_CHUNK):
                    received += len(chunk)
                    _check_size(uri, received, max_bytes)
                    sha.update(chunk)
                    md5.update(chunk)
                    out.write(chunk)
            _verify(uri, head, sha.hexdigest(), md5.hexdigest())
            blob = self.root / "blobs" / sha.hexdigest()
            os.replace(temp, blob)
            return blob
        finally:
            response["Body"].close()
            temp.unlink(missing_ok=True)

    @contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        with open(self.root / "locks" / f"{key}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def contained(folder: Path, relative: str, uri: S3Uri | None = None) -> Path:
    """``folder / relative``, resolved; refuse (:class:`UnsafeKeyError`) a path that is absolute, has an
    empty, ``.`` or ``..`` part, or resolves outside ``folder``."""
    parts = relative.split("/")
    where = f"{uri}: " if uri is not None else ""
    if any(part in ("", ".", "..") or "\x00" in part for part in parts):
        raise UnsafeKeyError(f"{where}key part {relative!r} is not a plain relative path (empty, '.' or '..' "
                             "segment, or a leading '/'); refusing to write it into the cache")
    base = folder.resolve()
    path = (base / relative).resolve()
    if path == base or not path.is_relative_to(base):
        raise UnsafeKeyError(f"{where}key part {relative!r} resolves to {path}, outside {base}")
    return path


def push_files(store: ObjectStore, source: Path, uri: str) -> list[str]:
    """Upload a folder (keeping relative paths) or one file under ``uri`` with ``sha256`` metadata."""
    root = S3Uri.parse(uri.rstrip("/"), allow_empty_key=True)
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    uploaded = []
    for file in files:
        relative = file.name if source.is_file() else file.relative_to(source).as_posix()
        target = root.join(relative)
        store.put_bytes(target, file.read_bytes(), metadata={"sha256": sha256_file(file)})
        uploaded.append(str(target))
    return uploaded


def _expected_sha256(head: dict[str, Any]) -> str | None:
    """The ``sha256`` user metadata when it is 64 hex digits (it names a folder: nothing else is trusted)."""
    value = head.get("Metadata", {}).get("sha256")
    return value.lower() if isinstance(value, str) and _SHA256.fullmatch(value.lower()) else None


def _file_name(uri: S3Uri) -> str:
    """The last segment of ``uri``'s key, as a file name; refused when it could leave its folder."""
    name = uri.key.rsplit("/", 1)[-1]
    if name in ("", ".", "..") or "\x00" in name:
        raise UnsafeKeyError(f"{uri}: the key does not end in a file name")
    return name


def _check_size(uri: S3Uri, size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise ObjectTooLargeError(f"{uri} is larger than this worker's limit of {max_bytes} bytes for it; "
                                  "nothing was kept")


def _touch(path: Path) -> None:
    with suppress(FileNotFoundError):
        os.utime(path)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _verify(uri: S3Uri, head: dict[str, Any], sha256: str, md5: str) -> None:
    expected = _expected_sha256(head)
    if expected and expected != sha256:
        raise ChecksumMismatch(f"{uri}: sha256 {sha256} does not match its recorded {expected}")
    etag = str(head.get("ETag", "")).strip('"')
    if not expected and etag and "-" not in etag and len(etag) == 32 and etag != md5:
        raise ChecksumMismatch(f"{uri}: MD5 {md5} does not match its ETag {etag}")


def _link(blob: Path, dest: Path) -> None:
    try:
        os.link(blob, dest)
    except FileExistsError:
        pass
    except OSError:
        shutil.copyfile(blob, dest)
