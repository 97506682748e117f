"""infra/k8s renders (kustomize subset) to objects valid for Kubernetes 1.30 and KEDA's ScaledObject CRD.

No kustomize binary or cluster here: `render` implements the part of kustomize the manifests use
(resources, namespace, patches by path: strategic merge for built-in kinds, JSON merge for custom
resources, `$patch: delete`) and refuses any other kustomization key, so what passes here means
the same to real kustomize. Built-in kinds are checked with kubernetes-validate's bundled schemas
in strict mode (unknown fields fail); ScaledObjects with the vendored KEDA CRD schema, closed.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from darkroom.common.fairness import backlog_key
from darkroom.common.queues import PRIORITY_STEPS, broker_list, cold_queue, hot_queue

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
K8S_VERSION = "1.30.0"
KUSTOMIZATIONS = [K8S / "base", *sorted(p for p in (K8S / "overlays").iterdir() if p.is_dir())]
SUPPORTED_KEYS = {"apiVersion", "kind", "namespace", "resources", "patches"}
CLUSTER_SCOPED = {"Namespace"}
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort", "volumeClaimTemplates": None}

Obj = dict[str, Any]


def _ident(obj: Obj) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def _is_builtin(obj: Obj) -> bool:
    group = obj["apiVersion"].rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")


def _merge(base: Any, patch: Any, *, strategic: bool, key: str = "") -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = _merge(base.get(k), v, strategic=strategic, key=k) if k in base else v
        return out
    merge_key = MERGE_KEYS.get(key)
    if strategic and merge_key and isinstance(base, list) and isinstance(patch, list):
        out = list(base)
        for item in patch:
            idx = next((i for i, b in enumerate(out) if b.get(merge_key) == item.get(merge_key)), None)
            if idx is None:
                out.append(item)
            else:
                out[idx] = _merge(out[idx], item, strategic=True)
        return out
    return patch


def render(directory: Path) -> list[Obj]:
    """The objects `kustomize build directory` would print (for the subset the manifests use)."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kust) - SUPPORTED_KEYS
    assert not unsupported, f"{directory}: kustomization keys {unsupported} are not rendered by the test"
    objects: list[Obj] = []
    for entry in kust.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects.extend(render(path))
        else:
            objects.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    for entry in kust.get("patches", []):
        assert set(entry) == {"path"}, f"{directory}: only patches by path are rendered: {entry}"
        for patch in yaml.safe_load_all((directory / entry["path"]).read_text()):
            patch = copy.deepcopy(patch)
            delete = patch.pop("$patch", None) == "delete"
            matches = [i for i, o in enumerate(objects) if _ident(o) == _ident(patch)]
            assert len(matches) == 1, f"{directory}: patch {entry['path']} matches {len(matches)} objects"
            (i,) = matches
            if delete:
                del objects[i]
            else:
                objects[i] = _merge(objects[i], patch, strategic=_is_builtin(objects[i]))
    if "namespace" in kust:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = kust["namespace"]
    return objects


def _closed(schema: Any) -> Any:
    """The CRD schema with additionalProperties: false wherever properties are listed (strict mode)."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out and out is not schema:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    return schema


KEDA_SCHEMA = _closed(json.loads((K8S / "crds" / "keda-scaledobject.schema.json").read_text()))


def validate(obj: Obj) -> None:
    """Raise if ``obj`` is not a valid object of its kind."""
    if obj["apiVersion"] == "keda.sh/v1alpha1":
        assert obj["kind"] == "ScaledObject", f"no schema vendored for {obj['kind']}"
        jsonschema.validate(obj, KEDA_SCHEMA)
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.fixture(scope="module", params=KUSTOMIZATIONS, ids=lambda p: p.name)
def rendered(request: pytest.FixtureRequest) -> list[Obj]:
    return render(request.param)


def test_every_object_is_valid_for_kubernetes_and_keda(rendered: list[Obj]) -> None:
    assert rendered
    for obj in rendered:
        validate(obj)
    idents = [_ident(o) for o in rendered]
    assert len(idents) == len(set(idents)), "duplicate objects"


def test_workers_have_a_gpu_heartbeat_probes_and_a_grace_period_over_the_longest_job(rendered: list[Obj]) -> None:
    workers = [o for o in rendered if o["kind"] == "Deployment" and o["metadata"]["name"].startswith("darkroom-worker-")]
    assert workers
    config = next(o for o in rendered if _ident(o) == ("ConfigMap", "darkroom-config"))["data"]
    for deployment in workers:
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        env = {e["name"]: e for e in container["env"]}
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert env["DARKROOM_WORKER_NAME"]["value"] == "$(POD_NAME)"
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["exec"]["command"][1] == "/etc/darkroom/probe/heartbeat.py"
        grace = pod["terminationGracePeriodSeconds"]
        assert 600 <= grace < int(config["DARKROOM_VISIBILITY_TIMEOUT_SECONDS"])
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/etc/darkroom/models.toml", "/var/lib/darkroom"} <= mounts
        assert any(p["kind"] == "PodDisruptionBudget" and p["spec"]["selector"]["matchLabels"].items()
                   <= deployment["spec"]["template"]["metadata"]["labels"].items() for p in rendered)


def test_each_pool_scales_on_every_priority_list_of_its_hot_and_cold_queues(rendered: list[Obj]) -> None:
    scaled = [o for o in rendered if o["kind"] == "ScaledObject"]
    assert scaled
    for so in scaled:
        target = next(o for o in rendered if _ident(o) == ("Deployment", so["spec"]["scaleTargetRef"]["name"]))
        registry = next(o for o in rendered if o["kind"] == "ConfigMap"
                        and o["metadata"].get("labels", {}).get("darkroom.dev/pool")
                        == target["metadata"]["labels"]["darkroom.dev/pool"])
        models = list(tomllib.loads(registry["data"]["models.toml"])["models"])
        lists = {t["metadata"]["listName"] for t in so["spec"]["triggers"] if t["type"] == "redis"}
        expected = {broker_list(q(m), p) for m in models for q in (hot_queue, cold_queue) for p in PRIORITY_STEPS}
        assert lists == expected | {backlog_key(m) for m in models}  # and the bulk work held for fair share
        names = [t["name"] for t in so["spec"]["triggers"]]
        formula = so["spec"]["advanced"]["scalingModifiers"]["formula"]
        assert sorted(formula.replace(" ", "").split("+")) == sorted(names), "the formula must sum every trigger"
        container = next(c for c in target["spec"]["template"]["spec"]["containers"]
                         if c["name"] == so["spec"]["scaleTargetRef"]["envSourceContainerName"])
        env = {e["name"] for e in container["env"]} | {"REDIS_ADDRESS"}  # REDIS_ADDRESS comes from envFrom
        for t in so["spec"]["triggers"]:
            if t["type"] == "redis":
                assert {t["metadata"]["addressFromEnv"], t["metadata"]["passwordFromEnv"]} <= env


def test_overlays_do_what_they_say() -> None:
    external = render(K8S / "overlays" / "external-redis")
    assert not [o for o in external if o["metadata"]["name"] == "redis"]
    config = next(o for o in external if _ident(o) == ("ConfigMap", "darkroom-config"))["data"]
    assert config["REDIS_ADDRESS"] != "redis:6379" and "DARKROOM_S3_REGION" in config
    single = render(K8S / "overlays" / "single-gpu-pool")
    (so,) = [o for o in single if o["kind"] == "ScaledObject"]
    assert so["spec"]["maxReplicaCount"] == 1 and len(so["spec"]["triggers"]) == 22


@pytest.mark.parametrize("breakage", ["unknown_field", "bad_gpu_type", "keda_unknown_field", "keda_missing_target"])
def test_a_broken_manifest_is_rejected(breakage: str) -> None:
    objects = render(K8S / "base")
    deployment = copy.deepcopy(next(o for o in objects if _ident(o) == ("Deployment", "darkroom-worker-sd15")))
    so = copy.deepcopy(next(o for o in objects if o["kind"] == "ScaledObject"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    if breakage == "unknown_field":
        container["livenessProbes"] = container.pop("livenessProbe")
        broken = deployment
    elif breakage == "bad_gpu_type":
        deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "15m"
        broken = deployment
    elif breakage == "keda_unknown_field":
        so["spec"]["cooldownPeriods"] = 60
        broken = so
    else:
        del so["spec"]["scaleTargetRef"]
        broken = so
    with pytest.raises((kubernetes_validate.ValidationError, jsonschema.ValidationError)):
        validate(broken)


def test_the_heartbeat_probe_passes_liveness_but_fails_readiness_when_redis_is_unreachable(tmp_path: Path) -> None:
    objects = render(K8S / "base")
    script = tmp_path / "heartbeat.py"
    script.write_text(next(o for o in objects if _ident(o) == ("ConfigMap", "darkroom-probe"))["data"]["heartbeat.py"])
    env = {"DARKROOM_REDIS_URL": "redis://127.0.0.1:1/0", "DARKROOM_WORKER_NAME": "w"}
    live = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=20)
    ready = subprocess.run([sys.executable, str(script), "--strict"], env=env, capture_output=True, text=True, timeout=20)
    assert (live.returncode, ready.returncode) == (0, 2), live.stdout + live.stderr + ready.stderr


def test_grafana_dashboard_is_json_with_a_panel_per_metric() -> None:
    dashboard = json.loads((ROOT / "infra" / "grafana" / "darkroom.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for metric in ["darkroom_jobs_total", "darkroom_job_seconds_bucket", "darkroom_batch_size_bucket",
                   "darkroom_model_cache_events_total", "darkroom_resident_bytes", "darkroom_adapter_switches_total",
                   "darkroom_device_memory_bytes", "darkroom_lease_takeovers_total",
                   "darkroom_webhook_deliveries_total", "darkroom_queue_depth"]:
        assert metric in exprs, metric


def _secret_refs(container: Obj) -> set[str]:
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})}
    return refs | {s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s}


def test_each_pod_is_given_only_the_secrets_it_needs(rendered: list[Obj]) -> None:
    pods = {o["metadata"]["name"]: o["spec"]["template"]["spec"] for o in rendered
            if o["kind"] in ("Deployment", "StatefulSet")}
    secrets = {o["metadata"]["name"] for o in rendered if o["kind"] == "Secret"}
    for name, spec in pods.items():
        (container,) = spec["containers"]
        refs = _secret_refs(container) | {v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
        assert refs <= secrets, f"{name} names a Secret that is not rendered: {refs - secrets}"
        if name.startswith("darkroom-worker"):
            assert refs == {"darkroom-redis", "darkroom-worker-s3"}, name   # no webhook secrets, no root S3 keys
        elif name == "darkroom-dispatcher":
            assert refs == {"darkroom-redis", "darkroom-webhooks"}, name    # no S3 keys
        elif name == "redis":
            assert refs == {"darkroom-redis", "darkroom-redis-acl"}, name


def test_redis_loads_the_producers_acl_users_with_the_start_script_of_compose(rendered: list[Obj]) -> None:
    by_name = {(o["kind"], o["metadata"]["name"]): o for o in rendered}
    if ("StatefulSet", "redis") not in by_name:
        return  # an overlay with an external Redis
    (container,) = by_name[("StatefulSet", "redis")]["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["sh", "/etc/darkroom/redis/start.sh"]
    assert "--requirepass" not in container["args"]  # an ACL file replaces it: the script writes the default user
    script = by_name[("ConfigMap", "darkroom-redis-start")]["data"]["start.sh"]
    assert script == (ROOT / "infra" / "redis" / "start.sh").read_text()
    assert "producers.acl" in by_name[("Secret", "darkroom-redis-acl")]["stringData"]
