"""The asyncio SDK: :class:`AsyncClient` offers the sync client's surface as coroutines, on ``redis.asyncio``.

    from darkroom.producer.aio import AsyncClient

    async with AsyncClient.from_env() as client:
        handles = await client.submit_many(jobs)                     # one round trip per 500 jobs
        async for event in client.watch([h.job_id for h in handles]):
            print(event.job_id, event.type)
        result = await handles[0].wait(timeout=60)

Waiting wakes on pub/sub (no polling loop); the blocking boto3 calls (upload, download) and job
preparation (a callback URL's DNS lookup) run in a thread with ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import redis
import redis.asyncio

from darkroom.common.broker import origin
from darkroom.common.clients import make_async_redis, make_redis, make_s3_client
from darkroom.common.events import JobEvent
from darkroom.common.fleet import AsyncFleet
from darkroom.common.jobs import Img2ImgJob, validate_job
from darkroom.common.jobstore import JobNotFound, JobRecord, Outage, job_key, raise_taken
from darkroom.common.objectstore import ObjectStore
from darkroom.common.producers import ProducerPolicy, policy_key
from darkroom.common.quotas import QUOTA_SCRIPT, quota_call, quota_refusal
from darkroom.common.results import JobResult
from darkroom.common.settings import Settings
from darkroom.common.storage import S3Uri
from darkroom.common.storage_hints import friendly_storage

from . import _durable
from . import _submission as submission
from ._cancel import cancel as cancel_job
from ._watch import Listen, Read, Watch
from .client import EventCallback

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = ["AsyncClient", "AsyncJobHandle"]


@dataclass(frozen=True)
class AsyncJobHandle:
    """A submitted job, for asyncio code: ``await handle.wait()``."""

    job_id: str
    client: AsyncClient

    async def status(self) -> JobRecord:
        return await self.client.status(self.job_id)

    async def wait(self, timeout: float | None = None, on_event: EventCallback | None = None) -> JobResult:
        """Until the job ends; its result, or JobFailed / JobCancelled / WaitTimeout."""
        return await self.client.wait(self.job_id, timeout=timeout, on_event=on_event)

    async def cancel(self) -> JobRecord:
        return await self.client.cancel(self.job_id)

    async def result(self) -> JobResult:
        return await self.client.result(self.job_id)


class AsyncClient:
    """Submits jobs and follows them from asyncio code; see :class:`darkroom.producer.Client` for the semantics."""

    def __init__(
        self,
        settings: Settings,
        *,
        redis_client: redis.asyncio.Redis | None = None,
        s3_client: Any | None = None,
    ) -> None:
        self.settings = settings
        self._redis = redis_client if redis_client is not None else make_async_redis(settings)
        self._s3_client = s3_client
        self.fleet = AsyncFleet(self._redis)
        self._stager = submission.Stager(settings.status_ttl_seconds, origin(), submission.signer(settings),
                                          fair=settings.fair_share)

    @classmethod
    def from_env(cls, **overrides: Any) -> Self:
        """Build from ``DARKROOM_*`` variables (or the embedded services' env file)."""
        return cls(Settings.load(**overrides))

    # -- lifecycle -------------------------------------------------------
    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._redis.aclose()

    # -- submitting ------------------------------------------------------
    async def prepare(self, job: submission.JobLike) -> Img2ImgJob:
        """Validate a job and fill what the producer decides (see ``Client.prepare``)."""
        job = validate_job(job if isinstance(job, Img2ImgJob) else dict(job))  # bad values fail before any I/O
        known = await self.fleet.catalog()
        return await asyncio.to_thread(submission.prepare, job, self.settings, known, await self.own_policy())

    async def own_policy(self) -> ProducerPolicy | None:
        """This producer's policy from the registry when the client signs (see ``Client.own_policy``)."""
        if self._stager.signer is None:
            return None
        raw = await self._redis.get(policy_key(self.settings.producer_id))
        return None if raw is None else ProducerPolicy.model_validate_json(raw)

    async def _take_quota(self, jobs: list[Img2ImgJob]) -> None:
        """Take this producer's quotas for ``jobs`` (see ``Client._take_quota``)."""
        policy = await self.own_policy()
        call = None if policy is None else quota_call(self.settings.producer_id, policy, [j.job_id or "" for j in jobs])
        if policy is None or call is None:
            return
        reply = await self._redis.eval(QUOTA_SCRIPT, 2, *call[0], *call[1])
        refusal = quota_refusal(reply, self.settings.producer_id, policy, len(jobs))
        if refusal is not None:
            raise refusal

    async def submit(
        self, job: submission.JobLike, *, priority: int | None = None, resubmit: bool = False
    ) -> AsyncJobHandle:
        """Validate, record as ``queued`` and enqueue a job, in one round trip (see ``Client.submit``)."""
        with _durable.redis_unavailable("submit the job"):
            job = await self.prepare(job)
            if resubmit:
                raw = await self._redis.get(job_key(job.job_id or ""))
                submission.check_owner(None if raw is None else JobRecord.read(raw), self.settings, "resubmit")
            await self._take_quota([job])
        raise_taken(await self._send([job], None, [job], priority=priority, resubmit=resubmit),
                    submission.taken_reason(resubmit))
        return AsyncJobHandle(job.job_id or "", self)

    async def _send(self, part: list[Img2ImgJob], first: int | None, every: list[Img2ImgJob], *,
                    priority: int | None = None, resubmit: bool = False) -> list[tuple[int | None, str]]:
        """Record and enqueue ``part`` in one round trip ending with WAIT (see ``Client._send``)."""
        wanted, timeout_ms = self.settings.wait_replicas, self.settings.redis_wait_timeout_ms
        with _durable.redis_unavailable("submit the jobs", every):
            pipe = self._redis.pipeline(transaction=False)
            for job in part:
                self._stager.stage(pipe, job, await self.fleet.queue_for(job.model), priority, resubmit=resubmit)
            _durable.add_wait(pipe, wanted, timeout_ms)
            replies, confirmed = _durable.split_wait(await pipe.execute(), wanted)
            taken = submission.taken(replies, part, first)
            if taken:  # a retry whose first try was recorded after all is not a taken id
                by_id = {job.job_id: job for job in part}
                raws = await self._redis.mget([job_key(job_id) for _, job_id in taken])
                taken = [t for t, raw in zip(taken, raws, strict=True)
                         if raw is None or not _durable.already_submitted(JobRecord.read(raw), by_id[t[1]])]
        _durable.require_replicas(confirmed, wanted, timeout_ms, every)
        return taken

    async def submit_chain(self, jobs: Iterable[submission.JobLike]) -> list[AsyncJobHandle]:
        """Submit jobs that each take the previous one's output 0 as input (see ``Client.submit_chain``)."""
        handles: list[AsyncJobHandle] = []
        for job in jobs:
            handles.append(await self.submit(submission.chained(job, handles[-1].job_id if handles else None)))
        return handles

    async def submit_many(
        self, jobs: Iterable[submission.JobLike], *, chunk: int = submission.DEFAULT_CHUNK, resubmit: bool = False
    ) -> list[AsyncJobHandle]:
        """Validate all jobs, then enqueue each ``chunk`` of them in one round trip (see ``Client.submit_many``)."""
        with _durable.redis_unavailable("submit the jobs"):
            known = await self.fleet.catalog()
            prepared = await asyncio.to_thread(submission.prepare_many, list(jobs), self.settings, known,
                                               await self.own_policy())
            await self._take_quota(prepared)
        taken: list[tuple[int | None, str]] = []
        for first, part in submission.chunks(prepared, chunk):
            taken += await self._send(list(part), first, prepared, resubmit=resubmit)
        raise_taken(taken, submission.taken_reason(resubmit))
        return [AsyncJobHandle(job.job_id or "", self) for job in prepared]

    def handle(self, job_id: str) -> AsyncJobHandle:
        return AsyncJobHandle(job_id, self)

    # -- following -------------------------------------------------------
    async def status(self, job_id: str) -> JobRecord:
        """The job's current record; raises JobNotFound for unknown (or expired) ids (NotPermitted: see
        ``Client.status``)."""
        with _durable.redis_unavailable(f"read job {job_id}"):
            raw = await self._redis.get(job_key(job_id))
        if raw is None:
            raise JobNotFound(job_id)
        record = JobRecord.read(raw)
        submission.check_owner(record, self.settings, "read")
        return record

    async def cancel(self, job_id: str, reason: str = "cancelled on request") -> JobRecord:
        """Cancel a job (see ``Client.cancel``); a job that already ended is left as it is. Returns its record."""
        await self.status(job_id)

        def cancel_now() -> JobRecord:  # the lifecycle's fenced script (or a signed request), on a sync connection
            client = make_redis(self.settings)
            try:
                return cancel_job(client, self.settings, job_id, reason=reason)
            finally:
                client.close()

        with _durable.redis_unavailable(f"cancel job {job_id}"):
            return await asyncio.to_thread(cancel_now)

    async def wait(self, job_id: str, timeout: float | None = None, on_event: EventCallback | None = None) -> JobResult:
        """Until the job ends, waking on its events; its result, or JobFailed / JobCancelled / WaitTimeout.

        ``on_event`` sees the job's state when the wait begins, then every change.
        """
        async for event in self.watch([job_id], timeout=timeout):
            if on_event is not None:
                on_event(event)
        return await self.result(job_id)

    async def result(self, job_id: str) -> JobResult:
        """The job's result now; JobFailed / JobCancelled if it ended so, WaitTimeout if it has not ended."""
        return (await self.status(job_id)).raise_for_outcome()

    async def watch(self, job_ids: Iterable[str], timeout: float | None = None) -> AsyncIterator[JobEvent]:
        """The jobs' events as they happen, until every job is terminal (see ``Client.watch``)."""
        watch, outage = Watch(job_ids, timeout), Outage(timeout)
        pubsub: Any = None
        try:
            while not watch.done:
                try:
                    if pubsub is None:
                        pubsub = self._redis.pubsub()
                        watch.subscribing()
                        await pubsub.subscribe(*watch.channels)
                    events = await self._watch_step(watch, pubsub)
                    outage.over()
                except _durable.REDIS_DOWN as exc:  # a failover: subscribe again on a new connection
                    _durable.reconnect_or_raise(exc, outage, "follow the jobs")
                    if pubsub is not None:
                        await pubsub.aclose()
                    pubsub = None
                    await asyncio.sleep(Outage.PAUSE_SECONDS)
                    continue
                for event in events:
                    yield event
        finally:
            if pubsub is not None:
                await pubsub.aclose()

    async def _watch_step(self, watch: Watch, pubsub: Any) -> list[JobEvent]:
        step = watch.next()
        if isinstance(step, Read):
            return watch.on_records(step.job_ids, await self._redis.mget([job_key(i) for i in step.job_ids]))
        return watch.on_message(await pubsub.get_message(timeout=step.timeout)) if isinstance(step, Listen) else []

    # -- objects ---------------------------------------------------------
    @property
    def store(self) -> ObjectStore:
        if self._s3_client is None:
            self._s3_client = make_s3_client(self.settings)
        return ObjectStore(self._s3_client)

    async def upload(self, source: bytes | str | Path | Image, uri: str, *, content_type: str | None = None) -> str:
        """Upload image bytes, a local file or a PIL image (saved as PNG) to ``uri``; return the URI.

        Raises ConfigurationError when there are no S3 credentials, StorageError when the server refuses them or
        the bucket does not exist, TransientError when it cannot be reached; each message says what to do.
        """
        target = S3Uri.parse(uri)
        data, kind = await asyncio.to_thread(submission.upload_payload, source, content_type)
        with friendly_storage(str(target), writing=True):
            await asyncio.to_thread(self.store.put_bytes, target, data, content_type=kind)
        return str(target)

    async def download(self, uri: str) -> bytes:
        """The object at ``uri`` as bytes (errors as :meth:`upload`'s)."""
        with friendly_storage(uri):
            return await asyncio.to_thread(self.store.get_bytes, S3Uri.parse(uri))

    async def open_images(self, result: JobResult) -> list[Image]:
        """The result's output images as PIL images, downloaded side by side (needs Pillow)."""
        blobs = await asyncio.gather(*(self.download(uri) for uri in result.uris))
        return [submission.open_image(blob) for blob in blobs]
