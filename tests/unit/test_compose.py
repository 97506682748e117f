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


def _spec() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def test_a_one_shot_service_creates_the_bucket_before_workers_start() -> None:
    services = _spec()["services"]
    buckets = services["buckets"]
    assert buckets["restart"] == "no" and "mc mb --ignore-existing local/darkroom" in " ".join(buckets["command"])
    assert buckets["depends_on"]["minio"]["condition"] == "service_healthy"
    for name, service in services.items():
        if name.startswith("worker-gpu"):
            assert service["depends_on"]["buckets"]["condition"] == "service_completed_successfully"


def test_every_darkroom_service_builds_from_the_repository() -> None:
    services = _spec()["services"]
    ours = {name: s for name, s in services.items() if str(s.get("image", "")).startswith("darkroom/")}
    assert {"dispatcher", "dashboard", "worker-gpu0", "worker-gpu1"} <= set(ours)
    for name, service in ours.items():
        dockerfile = ROOT / service["build"]["dockerfile"]
        assert service["build"]["context"] == "." and dockerfile.is_file(), name
    assert "dashboard" in services["dashboard"]["command"]
    assert "[dashboard]" in (ROOT / "infra" / "docker" / "producer.Dockerfile").read_text()


def test_prometheus_finds_every_worker_by_dns_without_edits() -> None:
    services = _spec()["services"]
    prometheus = yaml.safe_load((ROOT / "infra" / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    (dns,) = job["dns_sd_configs"]
    for name, service in services.items():
        if name.startswith("worker-gpu"):
            assert dns["names"][0] in service["networks"]["default"]["aliases"], name
            assert service["environment"]["DARKROOM_METRICS_PORT"] == str(dns["port"])
