from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from darkroom.common.settings import Settings
from darkroom.dev.process import WorkerProcess
from darkroom.producer.client import Client

pytestmark = pytest.mark.integration


def spawn_worker(services: object, settings: Settings, name: str, *args: str, state_dir: Path | None = None,
                 **env: str) -> WorkerProcess:
    """A `darkroom worker ARGS` subprocess (not started yet) on the session's services.

    ``env`` adds DARKROOM_* overrides; its log goes to ``<state_dir>/logs/<name>.log``.
    """
    state = state_dir or settings.state_dir
    full = {**services.as_env(), "DARKROOM_STATE_DIR": str(state), **env}  # type: ignore[attr-defined]
    return WorkerProcess(name, list(args), env=full, redis_url=full["DARKROOM_REDIS_URL"],
                         log_path=state / "logs" / f"{name}.log")


def plain_pipeline(model_dir: Path) -> Any:
    """diffusers' own img2img pipeline for ``model_dir``, loaded the way a diffusers user would (the reference
    that worker outputs are compared with)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(str(model_dir), safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def start_worker(services: object, settings: Settings, tiny_model: Path, *extra: str) -> WorkerProcess:
    """A started worker serving the tiny model as ``tiny`` (plus ``extra`` arguments)."""
    name = f"test-{uuid.uuid4().hex[:8]}"
    return spawn_worker(services, settings, name, "--model", f"tiny={tiny_model}", *extra).start(timeout=120)


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


CHAOS_ENV = {"DARKROOM_FAULT_INJECTION": "true", "DARKROOM_LEASE_SECONDS": "2", "DARKROOM_HEARTBEAT_SECONDS": "0.5",
             "DARKROOM_MAX_DELIVERIES": "2", "DARKROOM_PROGRESS_INTERVAL_SECONDS": "0", "DARKROOM_CPU_THREADS": "1"}


class Pool:
    """Workers serving one private model id, started and stopped by the test."""

    def __init__(self, services: Any, settings: Settings, tiny_model: Path) -> None:
        self.model = f"f{uuid.uuid4().hex[:6]}"
        self.services, self.settings, self.tiny_model = services, settings, tiny_model
        self.workers: list[WorkerProcess] = []

    def start(self, **env: str) -> WorkerProcess:
        worker = spawn_worker(self.services, self.settings, f"{self.model}-{len(self.workers)}", "--model",
                              f"{self.model}={self.tiny_model}", **{**CHAOS_ENV, **env}).start()
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        for worker in self.workers:
            worker.kill()


@pytest.fixture()
def pool(services: Any, settings: Settings, tiny_model: Path) -> Iterator[Pool]:
    p = Pool(services, settings, tiny_model)
    try:
        yield p
    finally:
        p.stop()
