"""docker-compose.yml is valid against the Compose specification (no Docker engine runs here)."""

from __future__ import annotations

import json
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


def test_each_service_is_given_only_the_secrets_it_needs() -> None:
    services = _spec()["services"]
    root = {"${S3_ACCESS_KEY_ID", "${S3_SECRET_ACCESS_KEY"}

    def env(name: str) -> str:
        return " ".join(str(v) for v in (services[name].get("environment") or {}).values())

    for name in services:
        uses_root = any(r in env(name) for r in root)
        assert uses_root == (name in ("minio", "buckets")), f"{name} and the MinIO root credentials"
        assert ("WEBHOOK_SECRETS" in env(name)) == (name == "dispatcher"), name
    worker = services["worker-gpu0"]["environment"]
    assert worker["DARKROOM_S3_ACCESS_KEY_ID"].startswith("${WORKER_S3_ACCESS_KEY_ID")
    assert services["dashboard"]["environment"]["DARKROOM_S3_ACCESS_KEY_ID"].startswith("${DASHBOARD_S3_ACCESS_KEY_ID")


def test_the_buckets_service_makes_the_scoped_s3_users_and_their_policies() -> None:
    command = " ".join(_spec()["services"]["buckets"]["command"])
    for line in ("mc admin policy create local darkroom-worker /etc/darkroom/s3/worker-policy.json",
                 'mc admin policy attach local darkroom-worker --user "$$WORKER_S3_ACCESS_KEY_ID"',
                 'mc admin policy attach local darkroom-dashboard --user "$$DASHBOARD_S3_ACCESS_KEY_ID"'):
        assert line in command
    worker = json.loads((ROOT / "infra" / "s3" / "worker-policy.json").read_text())
    writes = [s for s in worker["Statement"] if "s3:PutObject" in s["Action"]]
    assert [s["Resource"] for s in writes] == [["arn:aws:s3:::darkroom/outputs/*", "arn:aws:s3:::darkroom/quarantine/*"]]
    dashboard = json.loads((ROOT / "infra" / "s3" / "dashboard-policy.json").read_text())
    assert all(a.startswith(("s3:Get", "s3:List")) for s in dashboard["Statement"] for a in s["Action"])


def test_flower_gets_the_broker_url_from_the_environment_and_asks_for_a_password() -> None:
    flower = _spec()["services"]["flower"]
    assert not any("redis://" in part or "PASSWORD" in part for part in flower["command"])
    assert flower["environment"]["CELERY_BROKER_URL"].startswith("redis://:${REDIS_PASSWORD")
    assert ":${FLOWER_PASSWORD:?" in flower["environment"]["FLOWER_BASIC_AUTH"]


def test_redis_loads_the_producers_acl_users_at_every_start(tmp_path: Path) -> None:
    redis = _spec()["services"]["redis"]
    assert redis["command"][:2] == ["sh", "/etc/darkroom/redis-start.sh"] and "--requirepass" not in redis["command"]
    assert "./infra/redis/producers.acl:/etc/darkroom/producers.acl:ro" in redis["volumes"]
    # the script itself refuses a placeholder password, in one line
    result = subprocess.run(["sh", str(ROOT / "infra" / "redis" / "start.sh")], capture_output=True, text=True,
                            env={"REDIS_PASSWORD": "change-me-redis", "PATH": "/usr/bin:/bin"}, timeout=30)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "REDIS_PASSWORD is a placeholder; set a real secret (e.g. openssl rand -hex 24) in .env"]


def test_every_secret_in_the_example_env_is_a_placeholder_the_services_refuse() -> None:
    from darkroom.common.placeholders import is_placeholder

    values = dict(line.split("=", 1) for line in (ROOT / "infra" / "env.example").read_text().splitlines()
                  if line and not line.startswith("#"))
    for name, value in values.items():
        if "PASSWORD" in name or "SECRET" in name or name == "DASHBOARD_TOKEN":
            assert is_placeholder(value), name
    assert is_placeholder(json.loads(values["WEBHOOK_SECRETS"])["default"])
