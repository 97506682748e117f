"""The generated Redis ACL user of a producer, on a real Redis 7: it submits, follows and cancels its jobs
through the SDK, and cannot read the producer registry (so it cannot sign as anyone else) nor take jobs
off the queues. Needs ``redis-server`` >= 7 on PATH (ACL read/write key selectors); the embedded services'
Redis 6.2 has none (``apt-get install redis-server``)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr

from darkroom.common.cancels import CancelDesk
from darkroom.common.lifecycle import Lifecycle
from darkroom.common.producers import ProducerRegistry, acl_lines, policy_key
from darkroom.common.queues import cold_queue
from darkroom.common.settings import Settings
from darkroom.producer.client import Client

pytestmark = pytest.mark.integration


def _redis7() -> str | None:
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    major = version.split("v=", 1)[1].split(".", 1)[0] if "v=" in version else "0"
    return binary if int(major) >= 7 else None


@pytest.fixture(scope="module")
def redis7(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    binary = _redis7()
    if binary is None:
        pytest.fail("needs redis-server >= 7 on PATH (ACL key selectors): `make setup` installs it")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tmp_path_factory.mktemp("redis7")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server 7 did not start"
            time.sleep(0.05)
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_acl_user_submits_follows_and_cancels_but_cannot_read_keys_or_take_jobs(redis7: int,
                                                                                    tmp_path: Path) -> None:
    admin = redis.Redis(port=redis7)
    registry = ProducerRegistry(admin)
    entry, secret = registry.add("team-a")
    registry.add("team-b")
    # Given the producer's ACL user, made from the printed lines
    for line in acl_lines("team-a", "pw-a"):
        command, *args = line.split()[1:]
        assert admin.execute_command("ACL", command, *args) in (b"OK", "OK", True)
    settings = Settings(state_dir=tmp_path, redis_url=SecretStr(f"redis://darkroom-producer-team-a:pw-a@127.0.0.1:{redis7}/0"),
                        producer_id="team-a", producer_key_id=entry.keys[0].key_id, producer_key=SecretStr(secret))
    # When it submits (signed), reads the status and cancels through the SDK
    with Client(settings) as client:
        handle = client.submit({"model": "tiny", "image": "s3://darkroom/in/x.png", "prompt": "p", "priority": "bulk"})
        assert client.status(handle.job_id).status.value == "queued"
        # (a signed cancel is a request a worker answers: this test's worker side is a cancel desk on the admin user)
        desk = CancelDesk(admin, Lifecycle(admin), registry.get, max_age_seconds=600)
        answering = threading.Thread(target=desk.serve_once, kwargs={"timeout": 10})
        answering.start()
        assert client.cancel(handle.job_id).status.value == "cancelled"
        answering.join(10)
        assert list(client.watch([handle.job_id], timeout=5))[-1].status.value == "cancelled"
    # Then the registry (every producer's keys), other producers' records and taking a job off a queue are out of
    # its reach
    user = redis.Redis.from_url(settings.redis_url.get_secret_value())
    for attempt in (lambda: user.hgetall("darkroom:producers"), lambda: user.hget("darkroom:producers", "team-b"),
                    lambda: user.get(policy_key("team-b")), lambda: user.rpop(cold_queue("tiny") + ":6"),
                    lambda: user.flushdb(), lambda: user.keys("*"),
                    lambda: user.get("darkroom:job:team-b.x"), lambda: user.set("darkroom:job:team-b.x", "{}"),
                    lambda: user.delete("darkroom:job:team-b.x:cancel")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
    assert user.get(policy_key("team-a")) is not None  # its own policy: the SDK's early check
    # and a job of team-b's stays out of reach through the lifecycle too (cancel, resubmit)
    with Client(settings.model_copy(update={"redis_url": SecretStr(f"redis://127.0.0.1:{redis7}/0"),
                                            "producer_key": None})) as operator:
        other = operator.submit({"model": "tiny", "image": "s3://darkroom/in/x.png", "prompt": "p",
                                 "job_id": f"team-b.{time.time_ns()}"})
    with pytest.raises(redis.exceptions.NoPermissionError):
        Lifecycle(user).cancel(other.job_id)
    assert admin.get(f"darkroom:job:{other.job_id}") is not None
    user.close()
    admin.close()
