"""Placeholder secrets (``change-me``, an empty password) stop the worker, the dispatcher and the dashboard at
start-up: real processes, exit code 1, one line naming the setting, never the value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from darkroom.common.errors import ConfigurationError
from darkroom.common.placeholders import check_secrets, is_placeholder
from darkroom.common.settings import Settings

DARKROOM = str(Path(sys.executable).with_name("darkroom"))


@pytest.mark.parametrize("value", ["change-me-redis", "CHANGE_ME", "whsec_CHANGE_ME", "", "  ", "password",
                                   "<your password>", "minioadmin"])
def test_placeholders_are_recognised(value: str) -> None:
    assert is_placeholder(value)


@pytest.mark.parametrize("value", ["0f3c9a6d2b7e41c8a5f0", "whsec_MfKQ9r8GbT2", "dk_x8Ea1"])
def test_real_secrets_are_not(value: str) -> None:
    assert not is_placeholder(value)


def test_an_absent_redis_password_is_not_a_placeholder_but_an_empty_one_is(tmp_path: Path) -> None:
    check_secrets(Settings(state_dir=tmp_path, redis_url=SecretStr("redis://127.0.0.1:6379/0")))
    with pytest.raises(ConfigurationError, match="the password in DARKROOM_REDIS_URL is a placeholder"):
        check_secrets(Settings(state_dir=tmp_path, redis_url=SecretStr("redis://:@127.0.0.1:6379/0")))


def run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DARKROOM_")}
    return subprocess.run([DARKROOM, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**clean, "DARKROOM_STATE_DIR": str(tmp_path), **env})


REAL = "redis://:9c1d0f5e7a2b4c68@127.0.0.1:1/0"  # never reached: the check comes first


@pytest.mark.parametrize(("args", "env", "setting"), [
    (["worker", "--model", "tiny=/nonexistent"], {"DARKROOM_REDIS_URL": "redis://:change-me-redis@127.0.0.1:1/0"},
     "the password in DARKROOM_REDIS_URL"),
    (["worker", "--model", "tiny=/nonexistent"], {"DARKROOM_REDIS_URL": REAL,
                                                  "DARKROOM_S3_SECRET_ACCESS_KEY": "change-me-minio-secret"},
     "DARKROOM_S3_SECRET_ACCESS_KEY"),
    (["dispatcher"], {"DARKROOM_REDIS_URL": REAL, "DARKROOM_WEBHOOK_SECRETS": '{"default": "whsec_CHANGE_ME"}'},
     "DARKROOM_WEBHOOK_SECRETS['default']"),
    (["dashboard", "--host", "127.0.0.1", "--port", "1"],
     {"DARKROOM_REDIS_URL": REAL, "DARKROOM_DASHBOARD_TOKEN": "change-me-dashboard-admin"},
     "DARKROOM_DASHBOARD_TOKEN"),
])
def test_a_service_refuses_to_start_with_a_placeholder(args: list[str], env: dict[str, str], setting: str,
                                                      tmp_path: Path) -> None:
    result = run(args, tmp_path, **env)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [f"Error: {setting} is a placeholder; set a real secret (e.g. `openssl rand -hex 24`) and "
                     "start again"], result.stderr
    assert "change-me" not in result.stderr.lower() and "CHANGE_ME" not in result.stderr
