"""Expected conditions against real services: refused credentials, a missing bucket, services
stopped under attached workers. Each ends with one line and a documented exit code, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from darkroom.common.fleet import WORKERS_KEY, worker_key

pytestmark = pytest.mark.integration

DARKROOM = str(Path(sys.executable).with_name("darkroom"))


def run(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DARKROOM_")}
    return subprocess.run([DARKROOM, *args], cwd=cwd, env={**clean, **env}, capture_output=True, text=True,
                          timeout=120)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_wrong_s3_secret_exits_77(services: object, tmp_path: Path) -> None:
    picture = tmp_path / "a.png"
    picture.write_bytes(b"\x89PNG\r\n")
    env = {**services.as_env(), "DARKROOM_S3_SECRET_ACCESS_KEY": "not-the-secret"}  # type: ignore[attr-defined]
    result = run("upload", str(picture), "s3://darkroom/inputs/", cwd=tmp_path, env=env)
    assert result.returncode == 77
    assert "refused the credentials" in one_line(result)


def test_wrong_redis_password_exits_77(services: object, tmp_path: Path) -> None:
    env = services.as_env()  # type: ignore[attr-defined]
    url = env["DARKROOM_REDIS_URL"]
    assert "@" in url, "the embedded Redis has a password"
    scheme, rest = url.split("://", 1)
    wrong = f"{scheme}://:wrong-password@{rest.split('@', 1)[1]}"
    result = run("status", "some-job", cwd=tmp_path, env={**env, "DARKROOM_REDIS_URL": wrong})
    assert result.returncode == 77
    assert "Redis refused the credentials" in one_line(result)


def test_download_from_a_missing_bucket_says_so(services: object, tmp_path: Path) -> None:
    # (SeaweedFS creates a bucket on the first put, so an upload cannot show this here; AWS and MinIO
    # refuse the put, and upload says the same)
    result = run("download", "s3://no-such-bucket-here/x/", str(tmp_path / "out"), cwd=tmp_path,
                 env=services.as_env())  # type: ignore[attr-defined]
    assert result.returncode == 1
    assert "bucket 'no-such-bucket-here' does not exist" in one_line(result)


def test_upload_then_download_round_trip(services: object, tmp_path: Path) -> None:
    picture = tmp_path / "a.png"
    picture.write_bytes(b"\x89PNG\r\n-bytes")
    env = services.as_env()  # type: ignore[attr-defined]
    up = run("upload", str(picture), "s3://darkroom/cli-test/", "--json", cwd=tmp_path, env=env)
    assert up.returncode == 0 and json.loads(up.stdout) == ["s3://darkroom/cli-test/a.png"]
    down = run("download", "s3://darkroom/cli-test/a.png", str(tmp_path / "back"), cwd=tmp_path, env=env)
    assert down.returncode == 0, down.stderr
    assert (tmp_path / "back" / "a.png").read_bytes() == picture.read_bytes()
    missing = run("download", "no-such-job", str(tmp_path / "back"), cwd=tmp_path, env=env)
    assert missing.returncode == 1 and "no job 'no-such-job'" in missing.stderr


def test_services_down_warns_about_attached_workers(tmp_path: Path) -> None:
    # Given embedded services started in a folder, and a worker announcing itself to them
    env: dict[str, str] = {}
    up = run("services", "up", "--quiet", cwd=tmp_path, env=env)
    assert up.returncode == 0, up.stderr
    try:
        import redis

        settings = dict(line.split("=", 1) for line in (tmp_path / ".darkroom" / "services.env").read_text().split()
                        if "=" in line)
        client = redis.Redis.from_url(settings["DARKROOM_REDIS_URL"])
        client.sadd(WORKERS_KEY, "box-1")
        client.set(worker_key("box-1"), json.dumps({"name": "box-1", "pid": 999999, "time": time.time()}), ex=60)
        status = run("services", "status", cwd=tmp_path, env=env)
        assert status.returncode == 0 and "Redis" in status.stdout and "running" in status.stdout
        # When the services are stopped
        down = run("services", "down", cwd=tmp_path, env=env)
    finally:
        run("services", "down", cwd=tmp_path, env=env)
    # Then the worker is named, and how to stop it is said
    assert down.returncode == 0
    assert "box-1" in one_line(down) and "--stop-workers" in down.stderr
    stopped = run("services", "status", cwd=tmp_path, env=env)
    assert stopped.returncode == 1 and "stopped" in stopped.stdout


def test_sdk_upload_with_a_wrong_secret_says_which_settings_to_check(settings: Any) -> None:
    from pydantic import SecretStr

    from darkroom.common.errors import StorageError
    from darkroom.producer import Client

    wrong = settings.model_copy(update={"s3_secret_access_key": SecretStr("not-the-secret")})
    with Client(wrong) as client, pytest.raises(StorageError) as caught:
        client.upload(b"\x89PNG\r\n", "s3://darkroom/inputs/wrong-secret.png")
    message = str(caught.value)
    assert message.startswith("the S3 server refused the credentials (SignatureDoesNotMatch")
    assert "DARKROOM_S3_SECRET_ACCESS_KEY" in message and "not-the-secret" not in message

    # the asyncio client says the same
    import asyncio

    from darkroom.producer import AsyncClient

    async def upload() -> None:
        async with AsyncClient(wrong) as client:
            await client.upload(b"\x89PNG\r\n", "s3://darkroom/inputs/wrong-secret.png")

    with pytest.raises(StorageError, match="refused the credentials"):
        asyncio.run(upload())


def test_no_live_worker_wait_and_workers_say_so_and_how_to_start_one(tmp_path: Path) -> None:
    # Given services of their own, where no worker ever ran, and a job queued there
    env: dict[str, str] = {}
    up = run("services", "up", "--quiet", cwd=tmp_path, env=env)
    assert up.returncode == 0, up.stderr
    try:
        submitted = run("submit", "--model", "sketch", "--image", "s3://darkroom/inputs/a.png", "--prompt", "x",
                        cwd=tmp_path, env=env)
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip()
        # When a user waits for it, and lists the workers
        waited = run("wait", job_id, "--timeout", "1", cwd=tmp_path, env=env)
        listed = run("workers", cwd=tmp_path, env=env)
    finally:
        run("services", "down", cwd=tmp_path, env=env)
    # Then wait says at once that no worker serves the model and how to start one, then times out as documented
    assert waited.returncode == 3, waited.stderr
    assert "Traceback" not in waited.stderr
    note, timed_out = waited.stderr.strip().splitlines()
    assert note.startswith("darkroom: no live worker serves model 'sketch'")
    assert "darkroom worker --model sketch=SOURCE" in note and str(tmp_path / ".darkroom" / "services.env") in note
    assert timed_out.startswith("timed out")
    # and workers says none is alive, where it looked, and how to start one
    assert listed.returncode == 0 and "Traceback" not in listed.stderr
    assert listed.stdout.startswith("no live workers: none has sent a heartbeat")
    assert "darkroom worker --model ID=SOURCE" in listed.stdout
