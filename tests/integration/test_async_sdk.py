"""The asyncio SDK on real services: the same flow as the sync client, under asyncio.run."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from darkroom.common.errors import ErrorCode, InvalidJobError, JobCancelled, JobFailed, WaitTimeout
from darkroom.common.events import EventType, JobEvent
from darkroom.common.settings import Settings
from darkroom.common.status import JobStatus
from darkroom.dev.demo import sample_image
from darkroom.dev.process import WorkerProcess
from darkroom.producer.aio import AsyncClient
from darkroom.producer.client import Client

from .conftest import start_worker
from .test_sdk import QUICK, SLOW, TerminalListener

pytestmark = pytest.mark.integration


def run(coroutine: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, timeout=300))


async def upload(client: AsyncClient) -> str:
    return await client.upload(sample_image(64), f"s3://darkroom/inputs/{uuid.uuid4().hex}.png")


def test_submit_wait_result_and_images(settings: Settings, worker: WorkerProcess) -> None:
    async def flow() -> None:
        async with AsyncClient(settings) as client:
            uri = await upload(client)
            handle = await client.submit({"model": "tiny", "image": uri, **SLOW, "seed": 3})
            seen: list[JobEvent] = []
            result = await handle.wait(timeout=120, on_event=seen.append)
            assert result.worker == worker.name and result.seeds == [3]
            assert seen[-1].type is EventType.SUCCEEDED and any(e.type is EventType.PROGRESS for e in seen)
            assert (await handle.result()) == result == (await client.status(handle.job_id)).result
            images = await client.open_images(result)
            assert [image.size for image in images] == [(64, 64)]
            assert (await client.download(result.result_uri)).startswith(b"{")

    run(flow())


def test_wait_returns_within_100_ms_of_the_terminal_event(settings: Settings, worker: WorkerProcess) -> None:
    async def flow() -> None:
        async with AsyncClient(settings) as client:
            uri = await upload(client)
            handle = await client.submit({"model": "tiny", "image": uri, **SLOW})
            listener = TerminalListener(settings, handle.job_id)
            await handle.wait(timeout=120)
            returned, returned_wall = time.monotonic(), time.time()
            event = listener.join()
            assert returned_wall - event.time.timestamp() < 0.1, returned_wall - event.time.timestamp()
            assert returned - listener.received_at < 0.1, returned - listener.received_at

    run(flow())


def test_submit_many_and_watch_report_every_end(settings: Settings, worker: WorkerProcess) -> None:
    async def flow() -> None:
        async with AsyncClient(settings) as client:
            uri = await upload(client)
            jobs = [{"model": "tiny", "image": uri, **QUICK, "seed": i} for i in range(5)]
            jobs.append({"model": "tiny", "image": f"s3://darkroom/missing/{uuid.uuid4().hex}.png", **QUICK})
            handles = await client.submit_many(jobs, chunk=3)
            ends = {e.job_id: e async for e in client.watch([h.job_id for h in handles], timeout=180)
                    if e.status.is_terminal}
            assert len(ends) == 6
            assert [ends[h.job_id].type for h in handles] == [EventType.SUCCEEDED] * 5 + [EventType.FAILED]
            with pytest.raises(JobFailed) as failed:
                await handles[-1].result()
            assert failed.value.code == ErrorCode.INPUT_NOT_FOUND
            with pytest.raises(InvalidJobError, match=r"jobs\[1\].strength"):
                await client.submit_many([jobs[0], {**jobs[0], "strength": 7}])

    run(flow())


def test_cancel_a_running_job_while_watching_it(settings: Settings, worker: WorkerProcess) -> None:
    async def flow() -> None:
        async with AsyncClient(settings) as client:
            uri = await upload(client)
            handle = await client.submit({"model": "tiny", "image": uri, "prompt": "long", "strength": 1.0,
                                          "num_inference_steps": 400, "seed": 1})
            types = []
            async for event in client.watch([handle.job_id], timeout=120):
                types.append(event.type)
                if event.type is EventType.PROGRESS and EventType.CANCELLED not in types:
                    record = await handle.cancel()
                    assert record.status is JobStatus.CANCELLED
            assert types[-1] is EventType.CANCELLED
            with pytest.raises(JobCancelled):
                await handle.wait(timeout=5)
            after = await client.submit({"model": "tiny", "image": uri, **QUICK})
            assert (await after.wait(timeout=120)).worker == worker.name  # the worker moved on

    run(flow())


def test_cancel_a_queued_job_so_it_never_runs(
    client: Client, settings: Settings, services: Any, tiny_model: Path, worker: WorkerProcess
) -> None:
    model_id = f"a{uuid.uuid4().hex[:6]}"
    client.fleet.register_models([model_id])  # its workers are scaled to zero for now

    async def submit_two() -> tuple[str, str]:
        async with AsyncClient(settings) as aclient:
            uri = await upload(aclient)
            doomed = await aclient.submit({"model": model_id, "image": uri, **QUICK})
            kept = await aclient.submit({"model": model_id, "image": uri, **QUICK})
            assert (await doomed.cancel()).status is JobStatus.CANCELLED
            with pytest.raises(WaitTimeout):
                await kept.wait(timeout=0.5)  # nobody serves the model yet
            return doomed.job_id, kept.job_id

    async def outcome(doomed: str, kept: str) -> None:
        async with AsyncClient(settings) as aclient:
            assert (await aclient.wait(kept, timeout=120)).worker == process.name
            with pytest.raises(JobCancelled):
                await aclient.wait(doomed, timeout=5)
            record = await aclient.status(doomed)
            assert record.attempt == 0 and record.worker is None

    doomed, kept = run(submit_two())
    process = start_worker(services, settings, tiny_model, "--model", f"{model_id}={tiny_model}")
    try:
        run(outcome(doomed, kept))
    finally:
        process.stop()
