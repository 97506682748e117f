"""Models and adapters from s3://: downloaded once per host into the content-addressed cache, verified,
and served by a real worker."""

from __future__ import annotations

import json
import multiprocessing
import uuid
from pathlib import Path
from typing import Any

import pytest

from darkroom.common.clients import make_s3_client
from darkroom.common.objectstore import ObjectStore
from darkroom.common.settings import Settings
from darkroom.common.storage import S3Uri
from darkroom.dev.demo import sample_image
from darkroom.producer.client import Client
from darkroom.worker.filecache import ChecksumMismatch, FileCache, push_files

from ..conftest import png_bytes
from .conftest import spawn_worker

pytestmark = pytest.mark.integration


def _fetch_in_child(settings_json: str, root: str, uri: str, out: Any) -> None:
    settings = Settings.model_validate_json(settings_json)
    out.put(str(FileCache(Path(root), ObjectStore(make_s3_client(settings))).fetch_tree(S3Uri.parse(uri))))


def test_a_model_pushed_to_s3_is_fetched_once_verified_and_served(
    client: Client, services: Any, settings: Settings, tiny_model: Path, tmp_path: Path
) -> None:
    prefix = f"s3://darkroom/models/{uuid.uuid4().hex}"
    pushed = push_files(client.store, tiny_model, prefix)
    assert any(u.endswith("model_index.json") for u in pushed)
    # two processes on one host ask at once: one downloads, both get the same verified folder
    queue: Any = multiprocessing.get_context("spawn").Queue()
    procs = [multiprocessing.get_context("spawn").Process(
        target=_fetch_in_child, args=(_settings_json(settings), str(tmp_path / "cache"), prefix, queue))
        for _ in range(2)]
    for p in procs:
        p.start()
    paths = {queue.get(timeout=120) for _ in procs}
    for p in procs:
        p.join(30)
    assert len(paths) == 1
    folder = Path(paths.pop())
    assert (folder / "model_index.json").is_file()
    blobs = list((tmp_path / "cache" / "blobs").iterdir())
    assert len(blobs) == len(pushed) - _duplicate_contents(tiny_model)
    # a worker serves the s3:// model
    model = f"s3m{uuid.uuid4().hex[:6]}"
    worker = spawn_worker(services, settings, f"remote-{model}", "--model", f"{model}={prefix}",
                          state_dir=tmp_path / "worker-state", DARKROOM_CPU_THREADS="1").start()
    try:
        uri = client.upload(png_bytes(sample_image(64)), f"s3://darkroom/inputs/{uuid.uuid4().hex}.png")
        result = client.submit({"model": model, "image": uri, "prompt": "x", "strength": 0.5,
                                "num_inference_steps": 4, "seed": 1}).wait(timeout=120)
        assert result.parameters["model_source"] == prefix
    finally:
        worker.stop()


def test_a_tampered_object_is_refused(client: Client, tmp_path: Path, tiny_model: Path) -> None:
    prefix = f"s3://darkroom/models/{uuid.uuid4().hex}"
    push_files(client.store, tiny_model / "scheduler", prefix)
    target = S3Uri.parse(prefix).join("scheduler_config.json")
    client.store.put_bytes(target, b'{"tampered": true}', metadata={"sha256": "0" * 64})
    with pytest.raises(ChecksumMismatch):
        FileCache(tmp_path / "cache", client.store).fetch_tree(S3Uri.parse(prefix))
    assert not any((tmp_path / "cache" / "trees").iterdir())  # nothing half-made is left visible


def _settings_json(settings: Settings) -> str:
    """Settings for a child process, secrets included (they are SecretStr and dump as '**********')."""
    data = settings.model_dump(mode="json")
    for key in ("redis_url", "s3_access_key_id", "s3_secret_access_key"):
        value = getattr(settings, key)
        data[key] = value.get_secret_value() if value is not None else None
    return json.dumps(data)


def _duplicate_contents(folder: Path) -> int:
    from darkroom.worker.filecache import sha256_file

    hashes = [sha256_file(p) for p in folder.rglob("*") if p.is_file()]
    return len(hashes) - len(set(hashes))
