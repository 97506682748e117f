"""The SDK on real services: submit_many through the broker lists, watch, result, wait's latency, the CLI."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from darkroom.common.cli import main
from darkroom.common.errors import ErrorCode, InvalidJobError, JobFailed
from darkroom.common.events import EventType, JobEvent, event_channel
from darkroom.common.settings import Settings
from darkroom.common.status import JobStatus
from darkroom.dev.demo import sample_image
from darkroom.dev.process import WorkerProcess
from darkroom.producer.client import Client

from ..helpers import png_bytes

pytestmark = pytest.mark.integration

QUICK = {"prompt": "a boat", "strength": 0.5, "num_inference_steps": 2}  # one denoising step
SLOW = {"prompt": "a boat", "strength": 1.0, "num_inference_steps": 24}  # runs for a second or more


def upload(client: Client) -> str:
    return client.upload(png_bytes(sample_image(64)), f"s3://darkroom/inputs/{uuid.uuid4().hex}.png")


class TerminalListener:
    """Times the arrival of a job's terminal event on its channel, from a thread of its own."""

    def __init__(self, settings: Settings, job_id: str) -> None:
        self.redis = redis.Redis.from_url(settings.redis_url.get_secret_value())
        self.pubsub = self.redis.pubsub()
        self.pubsub.subscribe(event_channel(job_id))
        assert self.pubsub.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]
        self.event: JobEvent | None = None
        self.received_at = 0.0
        self.thread = threading.Thread(target=self._listen, daemon=True)
        self.thread.start()

    def _listen(self) -> None:
        for message in self.pubsub.listen():
            if message["type"] == "message":
                event = JobEvent.model_validate_json(message["data"])
                if event.status.is_terminal:
                    self.received_at, self.event = time.monotonic(), event
                    return

    def join(self) -> JobEvent:
        self.thread.join(10)
        self.pubsub.close()
        self.redis.close()
        assert self.event is not None, "no terminal event was published"
        return self.event


def test_submit_many_jobs_all_run_on_a_real_worker(client: Client, worker: WorkerProcess) -> None:
    # Given 20 jobs, half of them bulk (their messages go to the priority-6 list), sent in chunks of 7
    uri = upload(client)
    jobs = [{"model": "tiny", "image": uri, **QUICK, "seed": i, "priority": "bulk" if i % 2 else "interactive"}
            for i in range(20)]
    handles = client.submit_many(jobs, chunk=7)
    ids = [h.job_id for h in handles]
    # When we watch them all
    events = list(client.watch(ids, timeout=300))
    # Then each job's end is reported exactly once, and every one succeeded on the worker
    ends = [e for e in events if e.status.is_terminal]
    assert Counter(e.job_id for e in ends) == Counter(ids)
    assert {e.type for e in ends} == {EventType.SUCCEEDED}
    for i, handle in enumerate(handles):
        result = handle.result()
        assert result.worker == worker.name and result.seeds == [i]
    # And a second watch reports the finished jobs from their records, at once
    started = time.monotonic()
    again = list(client.watch(ids, timeout=10))
    assert [(e.job_id, e.type) for e in again] == [(i, EventType.SUCCEEDED) for i in ids]
    assert time.monotonic() - started < 2


def test_watch_yields_lifecycle_events_in_order_and_result_raises_the_failure(
    client: Client, worker: WorkerProcess
) -> None:
    uri = upload(client)
    good = client.submit({"model": "tiny", "image": uri, **SLOW, "num_inference_steps": 20, "seed": 1})
    bad = client.submit({"model": "tiny", "image": f"s3://darkroom/missing/{uuid.uuid4().hex}.png", **QUICK})
    events = list(client.watch([good.job_id, bad.job_id], timeout=120))
    mine = [e.type for e in events if e.job_id == good.job_id]
    assert mine[-1] is EventType.SUCCEEDED and EventType.STARTED in mine and EventType.PROGRESS in mine
    assert mine.index(EventType.STARTED) < mine.index(EventType.PROGRESS)
    failure = next(e for e in events if e.job_id == bad.job_id and e.status.is_terminal)
    assert failure.type is EventType.FAILED and failure.error_code == ErrorCode.INPUT_NOT_FOUND
    with pytest.raises(JobFailed) as raised:
        bad.result()
    assert raised.value.code == ErrorCode.INPUT_NOT_FOUND and "does not exist" in raised.value.message


def test_wait_returns_within_100_ms_of_the_terminal_event(
    client: Client, worker: WorkerProcess, settings: Settings
) -> None:
    uri = upload(client)
    for attempt in range(2):
        # Given a job that runs for a while, and a listener of our own on its channel
        handle = client.submit({"model": "tiny", "image": uri, **SLOW, "seed": attempt})
        listener = TerminalListener(settings, handle.job_id)
        # When wait() blocks until it ends
        assert client.status(handle.job_id).status in (JobStatus.QUEUED, JobStatus.STARTED)
        handle.wait(timeout=120)
        returned, returned_wall = time.monotonic(), time.time()
        event = listener.join()
        # Then it returned within 100 ms of the event's publication and of our listener's receipt
        assert event.type is EventType.SUCCEEDED
        assert returned_wall - event.time.timestamp() < 0.1, returned_wall - event.time.timestamp()
        assert returned - listener.received_at < 0.1, returned - listener.received_at


def test_submit_many_refuses_taken_ids_and_leaves_them_alone(client: Client, worker: WorkerProcess) -> None:
    uri = upload(client)
    first = client.submit({"model": "tiny", "image": uri, **QUICK, "seed": 1})
    first.wait(timeout=120)
    fresh = f"fresh-{uuid.uuid4().hex}"
    with pytest.raises(InvalidJobError, match=r"jobs\[1\].job_id=.*already exists"):
        client.submit_many([{"model": "tiny", "image": uri, **QUICK, "job_id": fresh},
                            {"model": "tiny", "image": uri, **QUICK, "job_id": first.job_id, "seed": 2}])
    with pytest.raises(InvalidJobError, match="already exists"):
        client.submit({"model": "tiny", "image": uri, **QUICK, "job_id": first.job_id})
    assert client.status(first.job_id).status is JobStatus.SUCCEEDED and first.result().seeds == [1]
    assert client.wait(fresh, timeout=120).worker == worker.name  # the rest of the batch went through


def test_cli_watch_prints_one_line_per_event(
    client: Client, worker: WorkerProcess, services: Any, settings: Settings
) -> None:
    env = {**services.as_env(), "DARKROOM_STATE_DIR": str(settings.state_dir)}
    uri = upload(client)
    ok = client.submit({"model": "tiny", "image": uri, **SLOW, "num_inference_steps": 10})
    shown = CliRunner().invoke(main, ["watch", ok.job_id], env=env)
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert f"{ok.job_id}  succeeded" in lines[-1]
    assert any(f"{ok.job_id}  started    attempt 1 on {worker.name}" in line for line in lines)
    assert any("progress   step" in line for line in lines)

    bad = client.submit({"model": "tiny", "image": f"s3://darkroom/missing/{uuid.uuid4().hex}.png", **QUICK})
    as_json = CliRunner().invoke(main, ["watch", "--json", ok.job_id, bad.job_id], env=env)
    assert as_json.exit_code == 1, as_json.output  # one of them failed
    events = [JobEvent.model_validate_json(line) for line in as_json.output.splitlines()]
    assert {(e.job_id, e.type) for e in events if e.status.is_terminal} == {
        (ok.job_id, EventType.SUCCEEDED), (bad.job_id, EventType.FAILED)}

    missing = CliRunner().invoke(main, ["watch", "no-such-job"], env=env)
    assert missing.exit_code == 1 and "no job 'no-such-job'" in missing.output


def test_submit_wait_draws_a_progress_bar_on_a_terminal(
    client: Client, worker: WorkerProcess, services: Any, settings: Settings
) -> None:
    uri = upload(client)
    env = {**os.environ, **services.as_env(), "DARKROOM_STATE_DIR": str(settings.state_dir)}
    darkroom = str(Path(sys.executable).with_name("darkroom"))
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [darkroom, "submit", "--model", "tiny", "--image", uri, "--prompt", "a boat", "--strength", "1.0",
         "--num-inference-steps", "20", "--wait"], stdout=subprocess.PIPE, stderr=terminal, env=env)
    os.close(terminal)
    stderr = _read_all(controller)
    stdout = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0, stderr
    assert "succeeded in" in stdout
    assert "\r[" in stderr and "#" * 30 in stderr and re.search(r"step (\d+)/\1 ", stderr), stderr


def _read_all(fd: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the other side closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode(errors="replace")


def _wait_with_client(client: Client, job_id: str) -> JobStatus:
    from darkroom.common.errors import JobCancelled

    with pytest.raises(JobCancelled):
        client.wait(job_id, timeout=60)
    return client.status(job_id).status


def _wait_with_watch(client: Client, job_id: str) -> JobStatus:
    return [event.status for event in client.watch([job_id], timeout=60)][-1]


def _wait_with_asyncio(client: Client, job_id: str) -> JobStatus:
    import asyncio

    from darkroom.common.errors import JobCancelled
    from darkroom.producer.aio import AsyncClient

    async def wait() -> JobStatus:
        async with AsyncClient(client.settings) as aclient:
            with pytest.raises(JobCancelled):
                await aclient.wait(job_id, timeout=60)
            return (await aclient.status(job_id)).status

    return asyncio.run(wait())


@pytest.mark.parametrize("waiter", [_wait_with_client, _wait_with_watch, _wait_with_asyncio],
                         ids=["wait", "watch", "asyncio-wait"])
def test_a_wait_outlives_its_subscription_being_dropped(client: Client, waiter: Any) -> None:
    from darkroom.common.jobs import Img2ImgJob
    from darkroom.common.lifecycle import Lifecycle

    rdb = client.jobs.redis
    job = Img2ImgJob.model_validate({"model": "nobody-serves-it", "image": "s3://darkroom/inputs/none.png",
                                     "prompt": "a boat", "job_id": uuid.uuid4().hex})
    client.jobs.create(job)
    before = {c["id"] for c in rdb.client_list() if int(c.get("sub", 0))}
    outcome: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: outcome.update(status=waiter(client, job.job_id)))
    thread.start()
    # Given the waiter (sync wait, sync watch or asyncio wait) subscribed to the job's events
    deadline = time.monotonic() + 10
    while not (mine := [c["id"] for c in rdb.client_list() if int(c.get("sub", 0)) and c["id"] not in before]):
        assert time.monotonic() < deadline, "the waiter never subscribed"
        time.sleep(0.05)
    # When the server drops that connection (as a failover or a restart does) and the job then ends
    for client_id in mine:
        rdb.client_kill_filter(_id=client_id)
    Lifecycle(rdb).cancel(job.job_id)
    thread.join(timeout=30)
    # Then the wait subscribed again and saw the job end instead of raising
    assert not thread.is_alive()
    assert outcome["status"] is JobStatus.CANCELLED
