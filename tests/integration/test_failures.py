"""Issue 6 on real services: leases, takeover after a kill, transient retries, worker-fatal recycling,
dead letters, deferred duplicates, warm shutdown and JSON-only messages.

Workers here run with fault injection on (``[[fault:...]]`` in a prompt, see darkroom.worker.faults),
short leases and fast heartbeats, and serve a model id of their own so no other worker interferes.
"""

from __future__ import annotations

import signal
import time
import uuid
from typing import Any

import pytest

from darkroom.common.errors import ErrorCode, JobFailed
from darkroom.common.queues import TASK_IMG2IMG
from darkroom.common.status import JobStatus
from darkroom.common.storage import S3Uri
from darkroom.dev.demo import sample_image
from darkroom.dev.process import WorkerProcess
from darkroom.producer.client import Client, JobHandle

from ..conftest import png_bytes
from .conftest import Pool

pytestmark = pytest.mark.integration

def submit(client: Client, pool: Pool, prompt: str = "a boat", steps: int = 8, **extra: Any) -> JobHandle:
    uri = client.upload(png_bytes(sample_image(64)), f"s3://darkroom/inputs/{uuid.uuid4().hex}.png")
    client.fleet.register_models([pool.model])  # known to the fleet even before its first worker starts
    return client.submit({"model": pool.model, "image": uri, "prompt": prompt, "strength": 1.0,
                          "num_inference_steps": steps, "seed": 5, **extra})


def objects(client: Client, handle: JobHandle) -> list[str]:
    job = client.status(handle.job_id).job
    root = S3Uri.parse(job.output_prefix or "", allow_empty_key=True).join(handle.job_id)
    listing = client.store.client.list_objects_v2(Bucket=root.bucket, Prefix=root.key + "/")
    return sorted(o["Key"].rsplit("/", 1)[-1] for o in listing.get("Contents", []))


def events(client: Client, handle: JobHandle) -> list[str]:
    return [e["event"] for e in client.jobs.history(handle.job_id)]


def celery_sender(client: Client, **conf: Any) -> Any:
    """A plain Celery producer on the same broker (what another, older or foreign, producer would use)."""
    from celery import Celery

    from darkroom.common.queues import celery_config

    app = Celery("other-producer", set_as_current=False)
    app.conf.update({**celery_config(client.settings), **conf})
    return app


def wait_dead(worker: WorkerProcess, timeout: float = 60) -> int:
    assert worker.proc is not None
    return worker.proc.wait(timeout)


def test_a_job_whose_worker_is_killed_is_taken_over_and_published_once(client: Client, pool: Pool) -> None:
    doomed, survivor = pool.start(), pool.start()
    handle = submit(client, pool, "[[fault:kill-once@3]] a boat", steps=8)
    started = time.monotonic()
    result = handle.wait(timeout=90)
    recovery = time.monotonic() - started
    assert result.attempt == 2 and result.worker in {doomed.name, survivor.name}
    assert not all(w.alive() for w in (doomed, survivor)), "the fault should have killed one worker"
    assert objects(client, handle) == ["000.png", "000.thumb.webp", "result.json"]
    assert events(client, handle).count("started") == 2
    assert recovery < 45, f"recovery took {recovery:.1f} s"


def test_transient_errors_are_retried_with_backoff_then_succeed(client: Client, pool: Pool) -> None:
    worker = pool.start()
    result = submit(client, pool, "[[fault:transient@1]] a boat").wait(timeout=90)
    history = events(client, client.handle(result.job_id))
    assert history.count("transient") == 2 and result.attempt == 3
    assert worker.alive()


def test_worker_fatal_requeues_once_then_fails_and_recycles_the_process(client: Client, pool: Pool) -> None:
    first, second = pool.start(), pool.start()
    handle = submit(client, pool, "[[fault:oom]] a boat")
    with pytest.raises(JobFailed) as failure:
        handle.wait(timeout=90)
    assert failure.value.code == ErrorCode.WORKER_FATAL
    assert events(client, handle).count("worker_fatal") == 2
    assert wait_dead(first) == 75 and wait_dead(second) == 75  # each recycled itself (EX_TEMPFAIL)


def test_a_job_that_keeps_killing_workers_goes_to_the_dead_letter_queue(client: Client, pool: Pool) -> None:
    handle = submit(client, pool, "[[fault:kill@2]] a boat")
    for _ in range(4):  # each worker dies on the job; a fresh one reclaims it
        worker = pool.start()
        deadline = time.monotonic() + 40
        while worker.alive() and not client.status(handle.job_id).status.is_terminal:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        if client.status(handle.job_id).status.is_terminal:
            break
    record = client.status(handle.job_id)
    assert record.status is JobStatus.FAILED and record.error_code == ErrorCode.DELIVERY_LIMIT
    dead = client.jobs.dead_letters()[handle.job_id]
    assert [e["event"] for e in dead["history"]].count("started") == 2
    assert pool.workers[-1].alive()  # the last worker dead-lettered it instead of dying


def test_a_duplicate_delivery_of_a_running_job_is_deferred_not_run_twice(client: Client, pool: Pool) -> None:
    pool.start(), pool.start()
    handle = submit(client, pool, "a long boat", steps=60)
    deadline = time.monotonic() + 60
    while client.status(handle.job_id).status is not JobStatus.STARTED:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # the broker redelivers the message while the first run goes on (as after a visibility timeout)
    payload = client.status(handle.job_id).job.model_dump(mode="json")
    celery_sender(client).send_task(TASK_IMG2IMG, args=[payload], task_id=handle.job_id,
                                    queue=client.fleet.queue_for(pool.model))
    result = handle.wait(timeout=120)
    time.sleep(3)  # let the deferred copy come back and see the job finished
    history = events(client, handle)
    assert history.count("started") == 1 and "deferred" in history and result.attempt == 1
    assert objects(client, handle) == ["000.png", "000.thumb.webp", "result.json"]


def test_sigterm_lets_the_running_job_finish(client: Client, pool: Pool) -> None:
    worker = pool.start()
    handle = submit(client, pool, "a long boat", steps=40)
    deadline = time.monotonic() + 60
    while client.status(handle.job_id).status is not JobStatus.STARTED:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert worker.proc is not None
    worker.proc.send_signal(signal.SIGTERM)
    assert handle.wait(timeout=120).worker == worker.name
    assert wait_dead(worker) == 0


def test_a_pickle_message_is_refused_and_the_worker_keeps_serving(client: Client, pool: Pool) -> None:
    worker = pool.start()
    handle = submit(client, pool)  # a normal job so the queue and model exist
    handle.wait(timeout=90)
    sender = celery_sender(client, task_serializer="pickle", accept_content=["pickle", "json"])
    job_id = uuid.uuid4().hex
    sender.send_task(TASK_IMG2IMG, args=[{"job_id": job_id}], task_id=job_id, queue=client.fleet.queue_for(pool.model),
                     serializer="pickle")
    after = submit(client, pool).wait(timeout=90)
    assert after.worker == worker.name and worker.alive()
    assert client.jobs.get(job_id) is None  # the pickle message never reached the job code
    assert "untrusted content" in worker.tail(200) or "pickle" in worker.tail(200)
