"""Fixtures of the integration tests (the helpers they build on are in helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from darkroom.common.settings import Settings
from darkroom.dev.process import WorkerProcess
from darkroom.producer.client import Client

from .helpers import Pool, start_worker

pytestmark = pytest.mark.integration


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


@pytest.fixture()
def pool(services: Any, settings: Settings, tiny_model: Path) -> Iterator[Pool]:
    p = Pool(services, settings, tiny_model)
    try:
        yield p
    finally:
        p.stop()
