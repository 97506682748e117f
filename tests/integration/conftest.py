from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from darkroom.common.settings import Settings
from darkroom.producer.client import Client
from darkroom.worker.process import WorkerProcess

pytestmark = pytest.mark.integration


def start_worker(services: object, settings: Settings, tiny_model: Path, *extra: str) -> WorkerProcess:
    env = {**services.as_env(), "DARKROOM_STATE_DIR": str(settings.state_dir)}  # type: ignore[attr-defined]
    name = f"test-{uuid.uuid4().hex[:8]}"
    return WorkerProcess(
        name, ["--model", f"tiny={tiny_model}", *extra], env=env,
        redis_url=env["DARKROOM_REDIS_URL"], log_path=settings.state_dir / "logs" / f"{name}.log",
    ).start(timeout=120)


@pytest.fixture(scope="session")
def worker(services: object, settings: Settings, tiny_model: Path) -> Iterator[WorkerProcess]:
    """One real `darkroom worker` process serving the tiny model for the session."""
    process = start_worker(services, settings, tiny_model)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture()
def client(settings: Settings) -> Iterator[Client]:
    with Client(settings) as c:
        yield c
