from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from darkroom.common.settings import Settings


def test_secrets_never_print(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DARKROOM_REDIS_URL", "redis://:hunter2@127.0.0.1:1/0")
    monkeypatch.setenv("DARKROOM_S3_SECRET_ACCESS_KEY", "topsecret")
    settings = Settings.load()
    assert "hunter2" not in repr(settings) and "topsecret" not in repr(settings)
    assert "hunter2" not in settings.model_dump_json()
    assert settings.redis_url.get_secret_value().endswith("@127.0.0.1:1/0")


def test_embedded_env_file_is_the_fallback_and_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "services.env").write_text("DARKROOM_REDIS_URL=redis://127.0.0.1:7000/0\nDARKROOM_S3_REGION=eu-west-1\n")
    monkeypatch.setenv("DARKROOM_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("DARKROOM_REDIS_URL", raising=False)
    monkeypatch.setenv("DARKROOM_S3_REGION", "us-west-2")
    settings = Settings.load()
    assert settings.redis_url.get_secret_value() == "redis://127.0.0.1:7000/0"
    assert settings.s3_region == "us-west-2"


def test_allowlist() -> None:
    assert Settings(allowed_buckets=[]).bucket_allowed("any")
    assert not Settings(allowed_buckets=["a"]).bucket_allowed("b")


def test_importing_the_packages_reads_no_environment() -> None:
    code = (
        "import os\n"
        "class Spy(dict):\n"
        "    def __getitem__(self, k):\n"
        "        if k.startswith('DARKROOM'): raise SystemExit('read ' + k)\n"
        "        return super().__getitem__(k)\n"
        "    def get(self, k, d=None):\n"
        "        if str(k).startswith('DARKROOM'): raise SystemExit('read ' + k)\n"
        "        return super().get(k, d)\n"
        "os.environ = Spy(os.environ)\n"
        "import darkroom.common, darkroom.producer, darkroom.producer.cli, darkroom.worker.cli\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr + result.stdout
