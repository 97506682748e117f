"""Ctrl-C during `darkroom augment`: the batch being sent goes out and is counted; no job after it."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import pytest

from darkroom.dev.process import WorkerProcess
from darkroom.producer.augment.submitter import Submitter
from darkroom.producer.client import Client

pytestmark = pytest.mark.integration


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
