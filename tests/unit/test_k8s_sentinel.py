"""infra/k8s/overlays/sentinel: two Redis data nodes, three Sentinels, and every Darkroom process asking them
(rendered and validated with the kustomize subset of test_k8s_manifests; the failover itself is tested live
with the embedded topology in tests/integration/test_redis_ha.py)."""

from __future__ import annotations

from darkroom.common.settings import Settings

from .test_k8s_manifests import K8S, _ident, render, validate


def test_the_sentinel_overlay_runs_two_data_nodes_and_three_sentinels() -> None:
    objects = render(K8S / "overlays" / "sentinel")
    for obj in objects:
        validate(obj)
    redis = next(o for o in objects if _ident(o) == ("StatefulSet", "redis"))
    assert redis["spec"]["replicas"] == 2
    (node,) = redis["spec"]["template"]["spec"]["containers"]
    assert node["command"] == ["sh", "/etc/darkroom/redis/start.sh"]  # the base's, with its Sentinel block on
    env = {e["name"]: e.get("value") for e in node["env"]}
    assert env["SENTINEL_HOST"] == "redis-sentinel" and env["REDIS_INITIAL_PRIMARY"] == "redis-0.redis"
    assert env["REDIS_ANNOUNCE_HOST"] == "$(POD_NAME).redis" and "REDIS_PASSWORD" in env
    script = next(o for o in objects if _ident(o) == ("ConfigMap", "darkroom-redis-start"))["data"]["start.sh"]
    assert "sentinel get-master-addr-by-name" in script and '--replicaof "$primary" 6379' in script
    assert "--masterauth" in script  # a restarted node follows the current primary; either may be a replica
    assert next(o for o in objects if _ident(o) == ("Service", "redis"))["spec"]["clusterIP"] == "None"

    sentinels = next(o for o in objects if _ident(o) == ("StatefulSet", "redis-sentinel"))
    assert sentinels["spec"]["replicas"] == 3 and sentinels["spec"]["serviceName"] == "redis-sentinel"
    (sentinel,) = sentinels["spec"]["template"]["spec"]["containers"]
    assert '"sentinel monitor darkroom redis-0.redis 6379 2"' in sentinel["command"][2]
    assert {m["mountPath"] for m in sentinel["volumeMounts"]} == {"/data"}  # its rewritten config persists


def test_every_darkroom_process_asks_the_sentinels_with_their_password() -> None:
    objects = render(K8S / "overlays" / "sentinel")
    config = next(o for o in objects if _ident(o) == ("ConfigMap", "darkroom-config"))["data"]
    settings = Settings.model_validate({"redis_sentinels": config["DARKROOM_REDIS_SENTINELS"],
                                        "redis_master_name": config["DARKROOM_REDIS_MASTER_NAME"]})
    sentinels = next(o for o in objects if _ident(o) == ("StatefulSet", "redis-sentinel"))
    service = sentinels["spec"]["serviceName"]
    assert settings.sentinel_addresses == [(f"redis-sentinel-{i}.{service}", 26379) for i in range(3)]
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} >= {"darkroom-worker-sd15", "darkroom-dispatcher"}
    for deployment in deployments:
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in container["env"]}
            secret = env["DARKROOM_REDIS_SENTINEL_PASSWORD"]["valueFrom"]["secretKeyRef"]
            assert secret == {"name": "darkroom-redis", "key": "REDIS_PASSWORD"}, deployment["metadata"]["name"]
            assert "DARKROOM_REDIS_URL" in env  # still the password and database
