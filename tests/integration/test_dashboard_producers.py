"""The dashboard by producer, through a real `darkroom dashboard` process on its own Redis database: a viewer bound
to a producer sees only that producer's jobs (list, page, pictures, live events) and no augmentation runs or
failed webhooks; an admin sees every job and can filter the list by producer."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from darkroom.common.clients import make_redis
from darkroom.common.events import ALL_EVENTS_CHANNEL
from darkroom.common.jobs import validate_job
from darkroom.common.jobstore import JOBS_INDEX_KEY, JobRecord, job_key
from darkroom.common.settings import Settings
from darkroom.common.status import JobStatus
from darkroom.dev.demo import sample_image
from darkroom.producer.client import Client

from ..conftest import png_bytes
from .test_dashboard import _free_port
from .test_producers import own_database

pytestmark = pytest.mark.integration

ADMIN = "admin-token-producers"
TEAM_A = "team-a-viewer-token"
TEAM_B = "team-b-viewer-token"


@pytest.fixture(scope="module")
def board(services: Any, settings: Settings) -> Iterator[dict[str, Any]]:
    url = own_database(settings.redis_url.get_secret_value(), 8)
    rdb = make_redis(settings.model_copy(update={"redis_url": SecretStr(url)}))
    rdb.flushdb()
    port = _free_port()
    log = settings.state_dir / "logs" / f"dashboard-producers-{port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **services.as_env(), "DARKROOM_STATE_DIR": str(settings.state_dir),
           "DARKROOM_REDIS_URL": url, "DARKROOM_DASHBOARD_TOKEN": ADMIN,
           "DARKROOM_DASHBOARD_PRODUCER_TOKENS": json.dumps({"team-a": TEAM_A, "team-b": TEAM_B})}
    command = [str(Path(sys.executable).parent / "darkroom"), "dashboard", "--port", str(port)]
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(base + "/healthz", timeout=2):
                break
        except OSError:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    try:
        yield {"url": base, "redis": rdb, "client": Client(settings.model_copy(update={"redis_url": SecretStr(url)}))}
    finally:
        proc.terminate()
        proc.wait(15)
        rdb.flushdb()
        rdb.close()


def record(board: dict[str, Any], producer: str) -> str:
    """A succeeded-looking record of ``producer``'s (verified by a worker), indexed, with an uploaded input."""
    client: Client = board["client"]
    job_id = f"{producer}.{uuid.uuid4().hex[:12]}"
    image = client.upload(png_bytes(sample_image(32)), f"s3://darkroom/dash-producers/{job_id}.png")
    job = validate_job({"job_id": job_id, "model": "tiny", "image": image, "prompt": f"of {producer}",
                        "producer": producer})
    now = datetime.now(UTC)
    entry = JobRecord(job_id=job_id, status=JobStatus.QUEUED, job=job, created_at=now, updated_at=now,
                      submission="s1", producer=producer)
    board["redis"].set(job_key(job_id), entry.model_dump_json())
    board["redis"].zadd(JOBS_INDEX_KEY, {job_id: now.timestamp()})
    return job_id


def get(board: dict[str, Any], path: str, token: str) -> tuple[int, str]:
    request = urllib.request.Request(board["url"] + path, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def test_a_producer_bound_viewer_sees_only_its_producers_jobs(board: dict[str, Any]) -> None:
    a, b = record(board, "team-a"), record(board, "team-b")
    # the list: its own jobs, whatever producer it asks for
    for path in ("/jobs?since=all", "/jobs?since=all&producer=team-b"):
        status, page = get(board, path, TEAM_A)
        assert status == 200 and a in page and b not in page, path
    # a job page and a picture of another producer's job are as if they did not exist
    assert get(board, f"/jobs/{a}", TEAM_A)[0] == 200
    status, page = get(board, f"/jobs/{b}", TEAM_A)
    assert b in page and "of team-b" not in page  # the "no such job" page names the id asked for, nothing more
    assert get(board, f"/media/{a}/input", TEAM_A)[0] == 200
    assert get(board, f"/media/{b}/input", TEAM_A)[0] == 404
    # runs and failed webhooks span producers: not shown to it
    assert get(board, "/augment", TEAM_A)[0] == 403 and get(board, "/webhooks", TEAM_A)[0] == 403
    # actions stay an admin's
    request = urllib.request.Request(board["url"] + f"/api/jobs/{a}/cancel", method="POST",
                                     headers={"Authorization": f"Bearer {TEAM_A}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 403


def test_an_admin_sees_every_job_and_filters_by_producer(board: dict[str, Any]) -> None:
    a, b = record(board, "team-a"), record(board, "team-b")
    status, page = get(board, "/jobs?since=all", ADMIN)
    assert status == 200 and a in page and b in page
    status, page = get(board, "/jobs?since=all&producer=team-b", ADMIN)
    assert b in page and a not in page
    assert get(board, f"/media/{b}/input", ADMIN)[0] == 200


def test_a_bound_viewers_live_stream_carries_only_its_producers_job_events(board: dict[str, Any]) -> None:
    a, b = record(board, "team-a"), record(board, "team-b")
    seen: list[str] = []
    done = threading.Event()
    credentials = base64.b64encode(f"x:{TEAM_A}".encode()).decode()

    def listen() -> None:
        request = urllib.request.Request(board["url"] + "/events", headers={"Authorization": f"Basic {credentials}"})
        with urllib.request.urlopen(request, timeout=60) as stream:
            for raw in stream:
                line = raw.decode().strip()
                if line.startswith("data: "):
                    seen.append(line[6:])
                if line == "event: hello":
                    done.set()  # subscribed
                if a in line:
                    return

    reader = threading.Thread(target=listen, daemon=True)
    reader.start()
    assert done.wait(30), "the stream never said hello"
    done.clear()
    # When team-b's job changes, then team-a's (published on the one channel every browser's hub reads)
    deadline = time.monotonic() + 60
    while reader.is_alive() and time.monotonic() < deadline:
        for job_id in (b, a):
            board["redis"].publish(ALL_EVENTS_CHANNEL, json.dumps({"type": "started", "job_id": job_id,
                                                                   "status": "started"}))
        reader.join(0.5)
    # Then the stream passed team-a's event and never team-b's
    assert not reader.is_alive(), "team-a's event never arrived"
    assert any(a in s for s in seen) and not any(b in s for s in seen)
