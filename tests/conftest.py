"""Shared fixtures. Integration fixtures start REAL services: a Redis server, a SeaweedFS S3
server and `darkroom worker` subprocesses. A service that cannot start fails the run; nothing skips."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from darkroom.common.settings import Settings

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def png_bytes(image: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # type: ignore[attr-defined]
    return buffer.getvalue()


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A private Redis + S3 server for the whole session (real processes on 127.0.0.1)."""
    from darkroom.dev.embedded import EmbeddedServices

    embedded = EmbeddedServices(tmp_path_factory.mktemp("services"))
    endpoints = embedded.up(timeout=60)
    try:
        yield endpoints
    finally:
        embedded.down()


@pytest.fixture(scope="session")
def settings(services: object, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    env = services.as_env()  # type: ignore[attr-defined]
    return Settings(
        state_dir=tmp_path_factory.mktemp("state"),
        redis_url=env["DARKROOM_REDIS_URL"],
        s3_endpoint_url=env["DARKROOM_S3_ENDPOINT_URL"],
        s3_access_key_id=env["DARKROOM_S3_ACCESS_KEY_ID"],
        s3_secret_access_key=env["DARKROOM_S3_SECRET_ACCESS_KEY"],
        s3_region=env["DARKROOM_S3_REGION"],
    )


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from darkroom.dev.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")
