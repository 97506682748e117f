"""The worker's file cache keeps to its folder, caps downloads and stays within its byte budget.

The store here is a narrow stand-in that keeps keys literally, as AWS S3 does (SeaweedFS folds
``a//b`` to ``a/b``, so the server used by the integration tests cannot show a listing key like
``sd//tmp/x/evil.pth``); the integration test drives the cap through a real worker.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from darkroom.common.errors import ObjectTooLargeError
from darkroom.common.storage import S3Uri
from darkroom.worker.filecache import FileCache, UnsafeKeyError, contained


class _Body:
    def __init__(self, data: bytes) -> None:
        self.stream = io.BytesIO(data)

    def iter_chunks(self, size: int) -> Iterator[bytes]:
        while chunk := self.stream.read(size):
            yield chunk

    def close(self) -> None:
        self.stream.close()


class LiteralStore:
    """Objects by exact key, listed and read as AWS S3 would: ``a//b`` stays ``a//b``."""

    def __init__(self, objects: dict[str, bytes], *, metadata: dict[str, dict[str, str]] | None = None) -> None:
        self.objects, self.metadata, self.reads = objects, metadata or {}, 0
        self.client = self

    def head(self, uri: S3Uri) -> dict[str, Any]:
        data = self.objects[uri.key]
        return {"ContentLength": len(data), "ETag": f'"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"',
                "Metadata": self.metadata.get(uri.key, {})}

    def get_paginator(self, name: str) -> LiteralStore:
        return self

    def paginate(self, Bucket: str, Prefix: str) -> list[dict[str, Any]]:  # noqa: N803 - boto3's names
        return [{"Contents": [{"Key": k, "ETag": self.head(S3Uri(Bucket, k))["ETag"], "Size": len(v)}
                              for k, v in sorted(self.objects.items()) if k.startswith(Prefix)]}]

    def get_object(self, Bucket: str, Key: str) -> dict[str, Any]:  # noqa: N803 - boto3's names
        self.reads += 1
        return {"Body": _Body(self.objects[Key])}


def cache(tmp_path: Path, store: LiteralStore, **options: Any) -> FileCache:
    return FileCache(tmp_path / "cache", store, **options)  # type: ignore[arg-type]


# -- paths stay inside ---------------------------------------------------------------------
@pytest.mark.parametrize("key", ["sd//tmp/x/evil.pth", "sd/../../evil.pth", "sd/./unet/w.bin", "sd/a//b.bin"])
def test_a_listing_key_that_leaves_the_tree_is_refused_before_anything_is_written(tmp_path: Path, key: str) -> None:
    outside = tmp_path / "tmp" / "x" / "evil.pth"
    store = LiteralStore({"sd/model_index.json": b"{}", key: b"payload"})
    with pytest.raises(UnsafeKeyError, match="refusing|outside"):
        cache(tmp_path, store).fetch_tree(S3Uri("darkroom", "sd"))
    assert not outside.exists() and not Path("/tmp/x/evil.pth").exists()
    assert store.reads == 0, "no object is read once one key is refused"
    assert not list((tmp_path / "cache" / "trees").iterdir())


def test_contained_resolves_and_refuses_absolute_and_climbing_paths(tmp_path: Path) -> None:
    assert contained(tmp_path, "unet/w.safetensors") == (tmp_path / "unet" / "w.safetensors").resolve()
    (tmp_path / "link").symlink_to("/etc")
    for relative in ("/tmp/x/evil.pth", "../evil", "a/../../evil", "", ".", "link/passwd"):
        with pytest.raises(UnsafeKeyError):
            contained(tmp_path, relative)


def test_a_tree_with_plain_keys_is_fetched_once(tmp_path: Path) -> None:
    store = LiteralStore({"sd/model_index.json": b"{}", "sd/unet/w.bin": b"weights"})
    files = cache(tmp_path, store)
    tree = files.fetch_tree(S3Uri("darkroom", "sd"))
    assert (tree / "unet" / "w.bin").read_bytes() == b"weights"
    assert files.fetch_tree(S3Uri("darkroom", "sd")) == tree and store.reads == 2


def test_sha256_metadata_that_is_not_a_digest_never_names_a_folder(tmp_path: Path) -> None:
    evil = ("../" * 19 + "tmp/").ljust(64, "x")  # 64 characters, as a digest would be
    assert len(evil) == 64
    store = LiteralStore({"l/a.safetensors": b"lora"}, metadata={"l/a.safetensors": {"sha256": evil}})
    path = cache(tmp_path, store).fetch_file(S3Uri("darkroom", "l/a.safetensors"))
    assert path.is_relative_to(tmp_path / "cache" / "files") and path.read_bytes() == b"lora"


@pytest.mark.parametrize("key", ["l/..", "l/", "l/."])
def test_a_file_key_without_a_file_name_is_refused(tmp_path: Path, key: str) -> None:
    store = LiteralStore({key: b"x"})
    with pytest.raises(UnsafeKeyError):
        cache(tmp_path, store).fetch_file(S3Uri("darkroom", key))


# -- downloads are capped --------------------------------------------------------------------
def test_a_file_over_the_cap_is_refused_from_its_size_before_it_is_read(tmp_path: Path) -> None:
    store = LiteralStore({"l/big.safetensors": b"x" * 5000})
    with pytest.raises(ObjectTooLargeError, match="limit of 4096 bytes"):
        cache(tmp_path, store).fetch_file(S3Uri("darkroom", "l/big.safetensors"), max_bytes=4096)
    assert store.reads == 0


def test_a_file_that_grows_past_the_cap_while_streaming_is_dropped(tmp_path: Path) -> None:
    store = LiteralStore({"l/big.safetensors": b"x" * (3 << 20)})
    real_head = store.head
    store.head = lambda uri: {**real_head(uri), "ContentLength": 10}  # type: ignore[method-assign]  # a lying size
    files = cache(tmp_path, store)
    with pytest.raises(ObjectTooLargeError):
        files.fetch_file(S3Uri("darkroom", "l/big.safetensors"), max_bytes=1 << 20)
    assert files.usage_bytes() == 0 and not list((tmp_path / "cache" / "tmp").iterdir())


def test_without_a_cap_any_size_is_fetched(tmp_path: Path) -> None:
    store = LiteralStore({"m/model.safetensors": b"x" * 5000})
    assert cache(tmp_path, store).fetch_file(S3Uri("darkroom", "m/model.safetensors")).stat().st_size == 5000


# -- the byte budget -------------------------------------------------------------------------
def _age(path: Path, seconds_ago: float) -> None:
    then = time.time() - seconds_ago
    os.utime(path, (then, then))


def test_past_the_budget_the_least_recently_used_files_go(tmp_path: Path) -> None:
    store = LiteralStore({f"l/{n}.safetensors": bytes([n]) * 1000 for n in range(4)})
    files = cache(tmp_path, store, budget_bytes=2500, min_age_seconds=0)
    first, second = (files.fetch_file(S3Uri("darkroom", f"l/{n}.safetensors")) for n in (0, 1))
    _age(first.parent, 30)
    _age(second.parent, 20)
    files.fetch_file(S3Uri("darkroom", "l/0.safetensors"))  # used again: now the most recent of the two
    third = files.fetch_file(S3Uri("darkroom", "l/2.safetensors"))
    assert files.usage_bytes() <= 2500
    assert first.is_file() and third.is_file() and not second.exists()


def test_a_tree_is_evicted_whole_and_its_blobs_freed(tmp_path: Path) -> None:
    store = LiteralStore({"a/x.bin": b"a" * 1000, "a/y.bin": b"b" * 1000, "l/z.safetensors": b"z" * 1000})
    files = cache(tmp_path, store, budget_bytes=1500, min_age_seconds=0)
    tree = files.fetch_tree(S3Uri("darkroom", "a"))
    _age(tree, 60)
    kept = files.fetch_file(S3Uri("darkroom", "l/z.safetensors"))
    assert not tree.exists() and kept.is_file() and files.usage_bytes() == 1000


def test_recently_used_entries_are_never_evicted(tmp_path: Path) -> None:
    store = LiteralStore({f"l/{n}.safetensors": bytes([n]) * 1000 for n in range(3)})
    files = cache(tmp_path, store, budget_bytes=1000, min_age_seconds=3600)
    paths = [files.fetch_file(S3Uri("darkroom", f"l/{n}.safetensors")) for n in range(3)]
    assert all(p.is_file() for p in paths), "in use within min_age_seconds: kept, over budget"
