"""Shared fixtures. Integration fixtures start REAL services: a Redis server, a SeaweedFS S3
server and `darkroom worker` subprocesses. A service that cannot start fails the run; nothing skips."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from darkroom.common.settings import Settings

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


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


# The demo's trained model (.darkroom/models/demo, the cache `make demo` uses) takes 2-3 minutes of one core to
# train. When a selected test needs it and it is not there yet, a low-priority process trains it from the start
# of the session, on the core the other tests leave idle while they wait on their workers; `demo_model` waits.
DEMO_MODEL_DIR = Path(__file__).resolve().parents[1] / ".darkroom" / "models" / "demo"
_TRAINING: list[subprocess.Popen[bytes]] = []


@pytest.hookimpl(trylast=True)  # after `-m` / `-k` have deselected: only a selected test starts the training
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    wanted = any("demo_model" in getattr(item, "fixturenames", ()) for item in items)
    if not wanted or config.getoption("collectonly"):
        return
    from darkroom.dev.trained import is_demo_model_dir

    if is_demo_model_dir(DEMO_MODEL_DIR):
        return
    DEMO_MODEL_DIR.parent.mkdir(parents=True, exist_ok=True)
    code = "import sys; from pathlib import Path; from darkroom.dev.trained import make_demo_model; " \
           "make_demo_model(Path(sys.argv[1]), log=print)"
    with (DEMO_MODEL_DIR.parent / "demo-training.log").open("wb") as log:  # the child keeps its own copy
        _TRAINING.append(subprocess.Popen([sys.executable, "-u", "-c", code, str(DEMO_MODEL_DIR)], stdout=log,
                                          stderr=subprocess.STDOUT, preexec_fn=lambda: os.nice(19)))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for process in _TRAINING:
        if process.poll() is None:  # a selection that ended first: the model folder is only ever renamed in whole
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The trained demo model (see above): waits for the background training, or trains here."""
    from darkroom.dev.trained import make_demo_model

    for process in _TRAINING:
        if process.wait(timeout=1800) != 0:
            log = DEMO_MODEL_DIR.parent / "demo-training.log"
            raise RuntimeError(f"training the demo model failed (exit {process.returncode}): "
                               f"{log.read_text(errors='replace')[-3000:]}")
    return make_demo_model(DEMO_MODEL_DIR)
