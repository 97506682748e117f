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
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from darkroom.common.errors import ObjectNotFoundError, StorageError
from darkroom.common.objectstore import ObjectStore
from darkroom.common.storage import S3Uri

__all__ = ["FileCache", "ChecksumMismatch", "sha256_file", "push_files"]

_CHUNK = 1 << 20


class ChecksumMismatch(StorageError):
    """Raised when a downloaded file does not match its recorded checksum."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class FileCache:
    """Downloads ``s3://`` files and folders once per host, verified and shared."""

    def __init__(self, root: Path, store: ObjectStore) -> None:
        self.root = root
        self.store = store
        for sub in ("blobs", "files", "trees", "locks", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    # -- single files --------------------------------------------------------
    def fetch_file(self, uri: S3Uri) -> Path:
        """The local path of ``uri``'s content, downloading it once."""
        head = self.store.head(uri)
        name = Path(uri.key).name
        expected = _expected_sha256(head)
        if expected:
            cached = self.root / "files" / expected / name
            if cached.is_file():
                return cached
        with self._lock(hashlib.sha256(str(uri).encode()).hexdigest()):
            blob = self._download(uri, head)
            target = self.root / "files" / blob.name / name
            if not target.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                _link(blob, target)
            return target

    # -- folders ---------------------------------------------------------------
    def fetch_tree(self, uri: S3Uri) -> Path:
        """The local copy of every object under the prefix ``uri`` (a folder), downloading each blob once."""
        listing = self._list(uri)
        if not listing:
            raise ObjectNotFoundError(f"{uri} holds no objects")
        manifest = json.dumps(sorted((rel, obj["ETag"], obj["Size"]) for rel, obj in listing.items()))
        key = hashlib.sha256(manifest.encode()).hexdigest()
        target = self.root / "trees" / key
        if target.is_dir():
            return target
        with self._lock(key):
            if target.is_dir():
                return target
            staging = self.root / "tmp" / f"tree-{uuid.uuid4().hex}"
            for relative, obj in listing.items():
                source = S3Uri(uri.bucket, obj["Key"])
                blob = self._download(source, self.store.head(source))
                dest = staging / relative
                dest.parent.mkdir(parents=True, exist_ok=True)
                _link(blob, dest)
            staging.rename(target)
            return target

    # -- internals -------------------------------------------------------------
    def _list(self, uri: S3Uri) -> dict[str, dict[str, Any]]:
        prefix = uri.key.rstrip("/") + "/" if uri.key else ""
        paginator = self.store.client.get_paginator("list_objects_v2")
        found: dict[str, dict[str, Any]] = {}
        try:
            for page in paginator.paginate(Bucket=uri.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    relative = obj["Key"][len(prefix):]
                    if relative and not relative.endswith("/") and ".." not in Path(relative).parts:
                        found[relative] = obj
        except Exception as exc:  # noqa: BLE001 - botocore raises many types
            if "NoSuchBucket" in str(exc):
                raise ObjectNotFoundError(f"{uri}: bucket does not exist") from None
            raise
        return found

    def _download(self, uri: S3Uri, head: dict[str, Any]) -> Path:
        """Stream ``uri`` into blobs/<sha256>, verifying it; return the blob path."""
        expected = _expected_sha256(head)
        if expected and (self.root / "blobs" / expected).is_file():
            return self.root / "blobs" / expected
        temp = self.root / "tmp" / f"blob-{uuid.uuid4().hex}"
        sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
        response = self.store.client.get_object(Bucket=uri.bucket, Key=uri.key)
        try:
            with open(temp, "wb") as out:
                for chunk in response["Body"].iter_chunks(_CHUNK):
                    sha.update(chunk)
                    md5.update(chunk)
                    out.write(chunk)
            _verify(uri, head, sha.hexdigest(), md5.hexdigest())
            blob = self.root / "blobs" / sha.hexdigest()
            os.replace(temp, blob)
            return blob
        finally:
            temp.unlink(missing_ok=True)

    @contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        with open(self.root / "locks" / f"{key}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


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
    value = head.get("Metadata", {}).get("sha256")
    return value.lower() if isinstance(value, str) and len(value) == 64 else None


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
