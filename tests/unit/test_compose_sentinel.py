"""docker-compose.sentinel.yml: over the base file it is still a valid Compose file, and it forms the
Sentinel topology Darkroom's settings expect (no Docker engine runs here; the live failover is tested
with the embedded topology in tests/integration/test_redis_ha.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from darkroom.common.settings import Settings

from .test_compose import ROOT, check


def merged() -> dict[str, Any]:
    """The two files merged as ``docker compose -f base -f overlay`` merges them (maps merge, the rest replaces)."""
    def merge(base: Any, over: Any) -> Any:
        if isinstance(base, dict) and isinstance(over, dict):
            return {**base, **{k: merge(base.get(k), v) if k in base else v for k, v in over.items()}}
        return over

    base = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return merge(base, yaml.safe_load((ROOT / "docker-compose.sentinel.yml").read_text()))  # type: ignore[no-any-return]


def test_the_merged_file_matches_the_compose_spec(tmp_path: Path) -> None:
    target = tmp_path / "compose.yml"
    target.write_text(yaml.safe_dump(merged()))
    result = check(target)
    assert result.returncode == 0, result.stdout + result.stderr


def test_three_sentinels_with_quorum_two_watch_the_primary_and_a_replica_follows_it() -> None:
    services = merged()["services"]
    sentinels = {name: s for name, s in services.items() if name.startswith("sentinel-")}
    assert len(sentinels) == 3
    for name, service in sentinels.items():
        script = " ".join(service["command"])
        assert '"sentinel monitor darkroom redis 6379 2"' in script and "--sentinel" in script
        assert "requirepass $$REDIS_PASSWORD" in script and "auth-pass darkroom $$REDIS_PASSWORD" in script
        assert service["environment"]["SENTINEL_HOST"] == name
        assert service["volumes"] == [f"{name}-data:/data"]  # its rewritten config survives a restart
    script = (ROOT / "infra" / "redis" / "start.sh").read_text()
    assert '--replicaof "$primary" 6379' in script and "--masterauth" in script  # either node may be a replica
    for node, announced in (("redis", "redis"), ("redis-replica", "redis-replica")):
        service = services[node]
        assert service["command"][:2] == ["sh", "/etc/darkroom/redis-start.sh"], node  # the ACL users too
        assert "./infra/redis/start.sh:/etc/darkroom/redis-start.sh:ro" in service["volumes"], node
        env = service["environment"]
        assert env["SENTINEL_HOST"] in sentinels and env["REDIS_INITIAL_PRIMARY"] == "redis", node
        assert env["REDIS_ANNOUNCE_HOST"] == announced and "REDIS_PASSWORD" in env, node


def test_every_darkroom_service_asks_the_sentinels() -> None:
    services = merged()["services"]
    ours = {name: s for name, s in services.items() if str(s.get("image", "")).startswith("darkroom/")}
    assert {"dispatcher", "dashboard", "worker-gpu0", "worker-gpu1"} <= set(ours)
    sentinels = sorted(name for name in services if name.startswith("sentinel-"))
    for name, service in ours.items():
        env = service["environment"]
        settings = Settings.model_validate({"redis_sentinels": env["DARKROOM_REDIS_SENTINELS"],
                                            "redis_master_name": env["DARKROOM_REDIS_MASTER_NAME"]})
        assert sorted(host for host, _ in settings.sentinel_addresses) == sentinels, name
        assert {port for _, port in settings.sentinel_addresses} == {26379}
        assert settings.redis_master_name == "darkroom" and settings.wait_replicas == 1
        assert re.fullmatch(r"\$\{REDIS_PASSWORD:\?.*\}", env["DARKROOM_REDIS_SENTINEL_PASSWORD"]), name
        assert all(service["depends_on"][s]["condition"] == "service_healthy" for s in sentinels), name
        assert "DARKROOM_REDIS_URL" in env, name  # still the password and database
