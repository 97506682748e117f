"""Ctrl-C during `darkroom augment`: the batch being sent goes out and is counted; no job after it."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from typing import Any

import pytest

from darkroom.dev.process import WorkerProcess
from darkroom.producer.augment.submitter import Submitter
from darkroom.producer.client import Client

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_ctrl_c_during_a_send_lets_no_later_job_out(client: Client, worker: WorkerProcess) -> None:
    # Given eight jobs sent two at a time, and a Ctrl-C that arrives while the first pair is being staged
    jobs = [client.prepare({"model": "tiny", "image": "s3://darkroom/inputs/none.png", "prompt": "p", "seed": i})
            for i in range(8)]
    stop = threading.Event()
    sent_when_told: list[int] = []
    submitter: Any = None

    def on_sigint(_signum: int, _frame: object) -> None:  # what the CLI's handler does: stop, then say so
        stop.set()
        sent_when_told.append(submitter.progress().submitted)

    class InterruptingStager:
        def __init__(self) -> None:
            self.calls = 0

        def stage(self, *args: Any, **kwargs: Any) -> None:
            self.calls += 1
            if self.calls == 1:
                os.kill(os.getpid(), signal.SIGINT)
            client._stager.stage(*args, **kwargs)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        submitter = Submitter(client.jobs.redis, InterruptingStager(), client.fleet.queue_for, jobs,  # type: ignore[arg-type]
                              total=len(jobs), done=0, window=8, chunk=2, stop=stop)
        # When the run goes
        finished = submitter.run()
    finally:
        signal.signal(signal.SIGINT, previous)
    # Then the pair being sent went out and is counted in flight, and no job was staged after it
    assert not finished
    assert sent_when_told == [0]
    assert submitter.progress().submitted == 2 and len(submitter.in_flight) == 2
    assert submitter.stager.calls == 2 and len(submitter.waiting) == 6
    for job_id in submitter.in_flight:
        client.cancel(job_id)


def test_a_run_outlives_its_subscription_being_dropped(client: Client) -> None:
    from darkroom.common.lifecycle import Lifecycle
    from darkroom.common.status import JobStatus

    rdb = client.jobs.redis
    from darkroom.common.jobs import Img2ImgJob

    # Given a run of four jobs sent to a queue no worker reads (they stay queued), followed on its subscription
    jobs = [Img2ImgJob.model_validate({"model": "tiny", "image": "s3://darkroom/inputs/none.png", "prompt": "p",
                                       "seed": i, "job_id": uuid.uuid4().hex}) for i in range(4)]
    unread = f"test-unread-{uuid.uuid4().hex}"
    before = {c["id"] for c in rdb.client_list() if int(c.get("sub", 0))}
    submitter = Submitter(rdb, client._stager, lambda model: unread, jobs, total=len(jobs), done=0, window=4)
    outcome: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: outcome.update(finished=submitter.run()))
    runner.start()
    deadline = time.monotonic() + 10
    while not (mine := [c["id"] for c in rdb.client_list() if int(c.get("sub", 0)) and c["id"] not in before]) \
            or len(submitter.in_flight) < len(jobs):
        assert time.monotonic() < deadline, "the run never subscribed and sent its jobs"
        time.sleep(0.05)
    # When the server drops that subscription (as a failover does), and the jobs end while it is gone
    for client_id in mine:
        rdb.client_kill_filter(_id=client_id)
    for job in jobs:
        Lifecycle(rdb).cancel(job.job_id or "")
    runner.join(timeout=30)
    # Then the run subscribed again, read what it missed, and ended with every job counted once
    assert not runner.is_alive()
    assert outcome["finished"] is True
    assert submitter.outcomes == {job.job_id: JobStatus.CANCELLED for job in jobs}
    assert submitter.progress().failed == len(jobs) and not submitter.in_flight
    rdb.delete(unread)
