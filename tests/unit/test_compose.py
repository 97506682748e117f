"""docker-compose.yml is valid against the Compose specification (no Docker engine runs here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True, text=True, timeout=60,
    )


def test_compose_file_matches_the_compose_spec() -> None:
    result = check(ROOT / "docker-compose.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_validator_rejects_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yml"
    broken.write_text("services:\n  w:\n    image: x\n    deploy: {resources: {reservations: {devices: 3}}}\n")
    assert check(broken).returncode != 0


def test_one_worker_per_gpu_with_a_device_reservation() -> None:
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    workers = {name: s for name, s in spec["services"].items() if name.startswith("worker-gpu")}
    assert len(workers) >= 2 and {"redis", "minio"} <= set(spec["services"])
    ids = []
    for service in workers.values():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"]
        ids.extend(device["device_ids"])
    assert len(ids) == len(set(ids)), "two workers share a GPU"
