"""Redis high availability on real services: the ``--ha`` embedded topology (a primary, one replica, three Sentinels from the
same redis-server), a real worker and the SDK across a Sentinel failover after the primary is SIGKILLed.

Given jobs acknowledged by the SDK (each confirmed by a replica: WAIT 1), when the primary dies mid-run, then
every acknowledged job is found after the failover and ends succeeded with exactly one result, the worker keeps
serving, and a submission during the failover either succeeds or raises the retryable RedisUnavailable.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from darkroom.common.errors import NotReplicated, RedisUnavailable
from darkroom.common.settings import Settings
from darkroom.common.status import JobStatus
from darkroom.common.storage import S3Uri
from darkroom.dev.demo import sample_image
from darkroom.dev.embedded_ha import HAEndpoints, HAServices
from darkroom.dev.process import WorkerProcess
from darkroom.producer.aio import AsyncClient
from darkroom.producer.client import Client, JobHandle

from ..helpers import png_bytes

pytestmark = pytest.mark.integration

WORKER_ENV = {"DARKROOM_LEASE_SECONDS": "2", "DARKROOM_HEARTBEAT_SECONDS": "0.5", "DARKROOM_CPU_THREADS": "1",
              "DARKROOM_METRICS_PORT": "0", "DARKROOM_RECONCILE_GRACE_SECONDS": "3",
              "DARKROOM_RECONCILE_INTERVAL_SECONDS": "1", "DARKROOM_PROGRESS_INTERVAL_SECONDS": "0"}
FAILOVER_DEADLINE_S = 60  # a guard against a hang, not a performance threshold


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HAServices, HAEndpoints]]:
    services = HAServices(tmp_path_factory.mktemp("ha"), down_after_ms=1000, failover_timeout_ms=3000)
    endpoints = services.up(timeout=120)
    try:
        yield services, endpoints
    finally:
        services.down()


@pytest.fixture(scope="module")
def ha_settings(ha: tuple[HAServices, HAEndpoints]) -> Settings:
    return Settings.model_validate({k.removeprefix("DARKROOM_").lower(): v for k, v in ha[1].as_env().items()}
                                   | {"state_dir": ha[0].state_dir})


def start_worker(ha: tuple[HAServices, HAEndpoints], tiny_model: Path) -> WorkerProcess:
    services, endpoints = ha
    name = f"ha-{uuid.uuid4().hex[:6]}"
    env = {**endpoints.as_env(), "DARKROOM_STATE_DIR": str(services.state_dir), **WORKER_ENV}
    return WorkerProcess(name, ["--model", f"tiny={tiny_model}"], env=env, redis_url=endpoints.redis_url,
                         log_path=services.state_dir / "logs" / f"{name}.log").start(timeout=120)


def kill_primary(services: HAServices) -> str:
    """SIGKILL whichever data node is primary now; its address."""
    primary = services.primary()
    assert primary is not None
    state = json.loads(services.state_file.read_text())
    ha = json.loads(services.ha_file.read_text())
    port = int(primary.rsplit(":", 1)[1])
    pid = state["redis_proc"]["pid"] if port == state["redis_port"] else ha["replica_proc"]["pid"]
    os.kill(pid, signal.SIGKILL)
    return primary


def await_promotion(services: HAServices, old: str) -> str:
    """Until the Sentinels name another primary (polling them, no fixed sleep)."""
    deadline = time.monotonic() + FAILOVER_DEADLINE_S
    while (now := services.primary()) in (old, None):
        assert time.monotonic() < deadline, f"no failover from {old} within {FAILOVER_DEADLINE_S} s"
        time.sleep(0.05)
    return now


def objects(client: Client, handle: JobHandle) -> list[str]:
    job = client.status(handle.job_id).job
    assert job is not None
    root = S3Uri.parse(job.output_prefix or "", allow_empty_key=True).join(handle.job_id)
    listing = client.store.client.list_objects_v2(Bucket=root.bucket, Prefix=root.key + "/")
    return sorted(o["Key"].rsplit("/", 1)[-1] for o in listing.get("Contents", []))


def job(uri: str, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "image": uri, "prompt": "a boat", "strength": 1.0, "num_inference_steps": 6,
            "seed": 7, **extra}


def test_the_sentinels_watch_a_primary_with_an_in_sync_replica(ha: tuple[HAServices, HAEndpoints]) -> None:
    services, endpoints = ha
    topology = services.topology()
    assert topology["primary"] == f"127.0.0.1:{services.status()['redis']['port']}"
    assert sorted(topology["nodes"].values()) == ["master", "slave"]
    assert len(endpoints.sentinels) == 3 and all(services.status()[f"sentinel-{i}"]["running"] for i in (1, 2, 3))
    assert "***" in repr(endpoints) and endpoints.sentinel_password not in repr(endpoints)


def test_services_status_shows_the_topology_and_the_current_primary(ha: tuple[HAServices, HAEndpoints]) -> None:
    from click.testing import CliRunner

    from darkroom.dev.cli import services as services_cli

    services, _ = ha
    result = CliRunner().invoke(services_cli, ["status", "--state-dir", str(services.state_dir)])
    assert result.exit_code == 0, result.output
    assert f"primary       {services.primary()}  (master name 'darkroom'" in result.output
    for name in ("Redis", "S3 server", "redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"):
        assert re.search(rf"^  {name} +running ", result.output, re.M), (name, result.output)
    assert ha[1].sentinel_password not in result.output and ha[1].redis_url.split("@")[0] not in result.output


def test_acknowledged_jobs_survive_a_failover_and_the_worker_keeps_serving(
    ha: tuple[HAServices, HAEndpoints], ha_settings: Settings, tiny_model: Path
) -> None:
    services, _ = ha
    worker = start_worker(ha, tiny_model)
    try:
        with Client(ha_settings) as client:
            uri = client.upload(png_bytes(sample_image(64)), f"s3://darkroom/inputs/{uuid.uuid4().hex}.png")
            acknowledged = client.submit_many([job(uri, seed=i) for i in range(8)])  # each confirmed by WAIT 1

            # When the primary dies with jobs queued and running
            old = kill_primary(services)
            refused: list[tuple[RedisUnavailable, dict[str, Any]]] = []
            during: list[JobHandle] = []
            while services.primary() in (old, None):  # submissions during the failover: succeed or refuse clearly
                payload = job(uri, seed=100 + len(during) + len(refused))
                try:
                    during.append(client.submit(payload))
                except RedisUnavailable as exc:  # before the write (no jobs) or after it (the prepared job)
                    assert exc.retryable and exc.job_ids == [j.job_id for j in exc.jobs]
                    refused.append((exc, payload))
                time.sleep(0.05)  # pacing between tries, not a wait before a check
            new = await_promotion(services, old)
            assert new != old

            # The new primary has no replica until the old one returns: a submission is written but not confirmed
            # (a Sentinel that has not yet seen the promotion may still make a try raise RedisUnavailable)
            deadline = time.monotonic() + FAILOVER_DEADLINE_S
            while True:
                payload = job(uri, seed=900 + len(refused))
                try:
                    client.submit(payload)
                except NotReplicated as exc:
                    lonely = exc
                    break
                except RedisUnavailable as exc:
                    refused.append((exc, payload))
                    assert time.monotonic() < deadline, "the new primary never took a submission"
                    time.sleep(0.05)  # pacing between tries
                else:
                    pytest.fail("a submission was acknowledged with no replica to confirm it")
            assert lonely.retryable and lonely.confirmed == 0 and lonely.wanted == 1
            refused.append((lonely, {}))

            # The old primary comes back as a replica of the new one; refused submissions are retried as they are
            services.up(timeout=120)
            assert services.topology()["nodes"][old] == "slave"
            retried = [client.submit(exc.jobs[0] if exc.jobs else payload) for exc, payload in refused]
            assert client.submit(lonely.jobs[0]).job_id == lonely.job_ids[0]  # again: no duplicate

            # Then every acknowledged job is found and ends succeeded with exactly one result
            for handle in [*acknowledged, *during, *retried]:
                handle.wait(timeout=180)  # raises unless it succeeded
                assert client.status(handle.job_id).status is JobStatus.SUCCEEDED
                assert objects(client, handle) == ["000.png", "000.thumb.webp", "result.json"], handle.job_id
                history = [e["event"] for e in client.jobs.history(handle.job_id)]
                assert history.count("finished") == 1, (handle.job_id, history)
            assert worker.alive()
            assert client.submit(job(uri, seed=4242)).wait(timeout=120).job_id
            print(f"failover {old} -> {new}: {len(during)} submitted and {len(refused) - 1} refused during it")
    finally:
        worker.stop()


def test_the_async_sdk_follows_the_primary(ha: tuple[HAServices, HAEndpoints], ha_settings: Settings) -> None:
    services, _ = ha

    async def flow() -> int:
        async with AsyncClient(ha_settings) as client:
            handle = await client.submit({"model": "tiny", "image": "s3://darkroom/inputs/none.png", "prompt": "x",
                                          "strength": 0.5, "num_inference_steps": 2})
            assert (await client.status(handle.job_id)).job_id == handle.job_id
            await client.cancel(handle.job_id)
            return int((await client._redis.info("server"))["tcp_port"])

    primary = services.primary()
    assert primary is not None and asyncio.run(flow()) == int(primary.rsplit(":", 1)[1])  # whom the Sentinels name


def test_down_then_up_keeps_the_node_that_is_primary_and_its_data(ha: tuple[HAServices, HAEndpoints],
                                                                   ha_settings: Settings) -> None:
    """After the failover above the replica node is primary: a restart of everything must keep it so (the
    other node has older data) and keep what was written."""
    from darkroom.common.clients import make_redis

    services, _ = ha
    before = services.primary()
    client = make_redis(ha_settings)
    client.set("ha:probe", b"kept")
    assert client.wait(1, 1000) == 1
    client.close()
    services.down()
    assert not any(info["running"] for info in services.status().values())
    services.up(timeout=120)
    assert services.primary() == before
    client = make_redis(ha_settings)
    try:
        assert client.get("ha:probe") == b"kept"
    finally:
        client.close()
