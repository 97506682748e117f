"""The producer SDK: submit img2img jobs, follow them, fetch their results.

    from darkroom.producer import Client, Img2ImgJob

    with Client.from_env() as client:
        handle = client.submit(Img2ImgJob(model="tiny", image="s3://darkroom/in/cat.png", prompt="a cat"))
        result = handle.wait(timeout=60)
        print(result.uris)

Nothing here imports torch or diffusers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from darkroom.common.broker import origin
from darkroom.common.clients import make_redis, make_s3_client
from darkroom.common.events import JobEvent
from darkroom.common.fleet import Fleet
from darkroom.common.jobs import Img2ImgJob, validate_job
from darkroom.common.jobstore import JobRecord, JobStore, Outage, job_key, raise_taken
from darkroom.common.objectstore import ObjectStore
from darkroom.common.producers import ProducerPolicy, ProducerRegistry
from darkroom.common.quotas import QUOTA_SCRIPT, quota_call, quota_refusal
from darkroom.common.results import JobResult
from darkroom.common.settings import Settings
from darkroom.common.storage import S3Uri
from darkroom.common.storage_hints import friendly_storage

from . import _durable
from . import _submission as submission
from ._cancel import CANCEL_TIMEOUT_SECONDS
from ._cancel import cancel as cancel_job
from ._watch import Listen, Read, Watch

if TYPE_CHECKING:
    import redis
    from PIL.Image import Image

__all__ = ["Client", "JobHandle"]

EventCallback = Callable[[JobEvent], None]


@dataclass(frozen=True)
class JobHandle:
    """A submitted job. Cheap to create from an id: ``client.handle(job_id)``."""

    job_id: str
    client: Client

    def status(self) -> JobRecord:
        """The job's current record (see :meth:`Client.status`)."""
        return self.client.status(self.job_id)

    def wait(self, timeout: float | None = None, on_event: EventCallback | None = None) -> JobResult:
        """Block until the job ends; return its result or raise JobFailed / JobCancelled / WaitTimeout."""
        return self.client.wait(self.job_id, timeout=timeout, on_event=on_event)

    def cancel(self) -> JobRecord:
        """Cancel the job (see :meth:`Client.cancel`)."""
        return self.client.cancel(self.job_id)

    def result(self) -> JobResult:
        """The result now; raises JobFailed / JobCancelled if it ended so, WaitTimeout if it has not ended."""
        return self.client.result(self.job_id)


class Client:
    """Submits jobs to the queue and reads their status from Redis and results from S3."""

    def __init__(
        self,
        settings: Settings,
        *,
        redis_client: redis.Redis | None = None,
        s3_client: Any | None = None,
    ) -> None:
        self.settings = settings
        self._redis = redis_client if redis_client is not None else make_redis(settings)
        self.jobs = JobStore(self._redis, ttl_seconds=settings.status_ttl_seconds)
        self._s3_client = s3_client
        self.fleet = Fleet(self._redis)
        self._stager = submission.Stager(settings.status_ttl_seconds, origin(), submission.signer(settings),
                                          fair=settings.fair_share)

    @classmethod
    def from_env(cls, **overrides: Any) -> Self:
        """Build from ``DARKROOM_*`` variables (or the embedded services' env file)."""
        return cls(Settings.load(**overrides))

    # -- lifecycle -------------------------------------------------------
    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the Redis connections (``with Client(...)`` does it on leaving the block)."""
        self._redis.close()

    # -- submitting ------------------------------------------------------
    def prepare(self, job: submission.JobLike) -> Img2ImgJob:
        """Validate a job and fill what the producer decides: id, seed, output prefix and producer id.

        Raises InvalidJobError: a bad value, a bucket not allowed, a model no worker of the fleet serves, a
        ``callback_url`` on a private address (unless ``allow_private_callbacks`` is set).
        """
        job = validate_job(job if isinstance(job, Img2ImgJob) else dict(job))  # bad values fail before any I/O
        return submission.prepare(job, self.settings, self.fleet.catalog(), self.own_policy())

    def own_policy(self) -> ProducerPolicy | None:
        """This producer's policy from the registry when the client signs (None: no policy, or unsigned)."""
        if self._stager.signer is None:
            return None
        return ProducerRegistry(self._redis).policy(self.settings.producer_id)

    def _take_quota(self, jobs: list[Img2ImgJob]) -> None:
        """Take this producer's quotas for ``jobs`` (NotPermitted ``quota_exceeded`` with ``retry_after``)."""
        policy = self.own_policy()
        call = None if policy is None else quota_call(self.settings.producer_id, policy, [j.job_id or "" for j in jobs])
        if policy is None or call is None:
            return
        refusal = quota_refusal(self._redis.eval(QUOTA_SCRIPT, 2, *call[0], *call[1]), self.settings.producer_id,
                                policy, len(jobs))
        if refusal is not None:
            raise refusal

    def submit(self, job: submission.JobLike, *, priority: int | None = None, resubmit: bool = False) -> JobHandle:
        """Validate, record as ``queued`` and enqueue a job, in one round trip. Raises InvalidJobError for bad input
        or a ``job_id`` that exists already.

        The job goes to its model's hot queue when a live worker holds the model resident, else to its cold
        queue. ``priority`` (0 first .. 9) overrides the job's interactive/bulk priority. With ``resubmit`` a job
        of the same id that ended failed or cancelled is replaced atomically and runs again (its history moves
        to ``:history:previous``); one queued, running or succeeded is still refused.
        """
        with _durable.redis_unavailable("submit the job"):
            job = self.prepare(job)
            if resubmit:
                submission.check_owner(self.jobs.get(job.job_id or ""), self.settings, "resubmit")
            self._take_quota([job])
        raise_taken(self._send([job], None, [job], priority=priority, resubmit=resubmit),
                    submission.taken_reason(resubmit))
        return JobHandle(job.job_id or "", self)

    def _send(self, part: list[Img2ImgJob], first: int | None, every: list[Img2ImgJob], *,
              priority: int | None = None, resubmit: bool = False) -> list[tuple[int | None, str]]:
        """Record and enqueue ``part`` in one round trip that ends with WAIT for replicas (see ``_durable``);
        the ids refused as taken. ``every``: the submission's jobs, named by a retryable error."""
        wanted, timeout_ms = self.settings.wait_replicas, self.settings.redis_wait_timeout_ms
        with _durable.redis_unavailable("submit the jobs", every):
            pipe = self._redis.pipeline(transaction=False)
            for job in part:
                self._stager.stage(pipe, job, self.fleet.queue_for(job.model), priority, resubmit=resubmit)
            _durable.add_wait(pipe, wanted, timeout_ms)
            replies, confirmed = _durable.split_wait(pipe.execute(), wanted)
            taken = submission.taken(replies, part, first)
            if taken:  # a retry whose first try was recorded after all is not a taken id
                by_id = {job.job_id: job for job in part}
                records = self.jobs.get_many([job_id for _, job_id in taken])
                taken = [t for t, r in zip(taken, records, strict=True)
                         if not _durable.already_submitted(r, by_id[t[1]])]
        _durable.require_replicas(confirmed, wanted, timeout_ms, every)
        return taken

    def submit_many(
        self, jobs: Iterable[submission.JobLike], *, chunk: int = submission.DEFAULT_CHUNK, resubmit: bool = False
    ) -> list[JobHandle]:
        """Submit many jobs: all are validated first, then each ``chunk`` of them takes one Redis round trip.

        Raises InvalidJobError naming every bad job's index and fields (``jobs[3].strength``) before anything
        is sent. A job whose ``job_id`` exists already is neither recorded nor enqueued; the others are, and
        then InvalidJobError names the taken ids. ``resubmit`` works as in :meth:`submit`.
        """
        with _durable.redis_unavailable("submit the jobs"):
            prepared = submission.prepare_many(jobs, self.settings, self.fleet.catalog(), self.own_policy())
            if resubmit:
                for record in self.jobs.get_many([job.job_id or "" for job in prepared]):
                    submission.check_owner(record, self.settings, "resubmit")
            self._take_quota(prepared)
        taken: list[tuple[int | None, str]] = []
        for first, part in submission.chunks(prepared, chunk):
            taken += self._send(list(part), first, prepared, resubmit=resubmit)
        raise_taken(taken, submission.taken_reason(resubmit))
        return [JobHandle(job.job_id or "", self) for job in prepared]

    def submit_chain(self, jobs: Iterable[submission.JobLike]) -> list[JobHandle]:
        """Submit jobs that each take the previous one's output 0 as input (unless they name an ``image``):
        e.g. an SDXL base job, then a refiner job. Each runs once the one before succeeds; when that one fails,
        the next fails ``upstream_failed``; when it is cancelled, the next is cancelled too. For another output
        set ``image={"job": ID, "index": i}`` yourself."""
        handles: list[JobHandle] = []
        for job in jobs:
            handles.append(self.submit(submission.chained(job, handles[-1].job_id if handles else None)))
        return handles

    def handle(self, job_id: str) -> JobHandle:
        """A handle for a job submitted earlier, by its id (no round trip)."""
        return JobHandle(job_id, self)

    # -- following -------------------------------------------------------
    def status(self, job_id: str) -> JobRecord:
        """The job's current record; raises JobNotFound for unknown (or expired) ids, NotPermitted for another
        producer's job when this client signs."""
        with _durable.redis_unavailable(f"read job {job_id}"):
            record = self.jobs.require(job_id)
        submission.check_owner(record, self.settings, "read")
        return record

    def cancel(self, job_id: str, timeout: float = CANCEL_TIMEOUT_SECONDS) -> JobRecord:
        """Cancel a job: a queued one never runs, a running one stops at its next denoising step and
        publishes nothing. A job that already ended is left as it is. Returns the job's record.

        A signing client sends a signed request that a worker verifies (``timeout``: how long to wait for its
        answer); only the job's own producer is obeyed (NotPermitted otherwise), see docs/security.md.
        """
        with _durable.redis_unavailable(f"cancel job {job_id}"):
            return cancel_job(self._redis, self.settings, job_id, timeout)

    def wait(self, job_id: str, timeout: float | None = None, on_event: EventCallback | None = None) -> JobResult:
        """Block until the job ends, waking on its events; return the result or raise its outcome.

        ``on_event`` sees the job's state when the wait begins, then every change (:meth:`watch`).
        """
        self.status(job_id)
        for event in self.watch([job_id], timeout=timeout):
            if on_event is not None:
                on_event(event)
        return self.result(job_id)

    def result(self, job_id: str) -> JobResult:
        """The job's result now; raises JobFailed / JobCancelled if it ended so, WaitTimeout if it has not ended."""
        return self.status(job_id).raise_for_outcome()

    def watch(self, job_ids: Iterable[str], timeout: float | None = None) -> Iterator[JobEvent]:
        """Yield the jobs' events as they happen, ending once every job is terminal.

        First what each job's record shows now (so jobs that already ended are reported), then each change,
        in lifecycle order per job, from one pub/sub subscription to all of them. Raises JobNotFound for an
        unknown id and WaitTimeout when jobs are still running after ``timeout`` seconds.
        """
        watch, outage = Watch(job_ids, timeout), Outage(timeout)
        pubsub: Any = None
        try:
            while not watch.done:
                try:
                    if pubsub is None:
                        pubsub = self._redis.pubsub()  # type: ignore[no-untyped-call]
                        watch.subscribing()
                        pubsub.subscribe(*watch.channels)
                    events = self._watch_step(watch, pubsub)
                    outage.over()
                except _durable.REDIS_DOWN as exc:  # a failover: subscribe again on a new connection
                    _durable.reconnect_or_raise(exc, outage, "follow the jobs")
                    if pubsub is not None:
                        pubsub.close()
                    pubsub = None
                    time.sleep(Outage.PAUSE_SECONDS)
                    continue
                yield from events
        finally:
            if pubsub is not None:
                pubsub.close()

    def _watch_step(self, watch: Watch, pubsub: Any) -> list[JobEvent]:
        step = watch.next()
        if isinstance(step, Read):
            return watch.on_records(step.job_ids, self._redis.mget([job_key(i) for i in step.job_ids]))
        return watch.on_message(pubsub.get_message(timeout=step.timeout)) if isinstance(step, Listen) else []

    # -- objects ---------------------------------------------------------
    @property
    def store(self) -> ObjectStore:
        if self._s3_client is None:
            self._s3_client = make_s3_client(self.settings)
        return ObjectStore(self._s3_client)

    def upload(self, source: bytes | str | Path | Image, uri: str, *, content_type: str | None = None) -> str:
        """Upload image bytes, a local file or a PIL image (saved as PNG) to ``uri``; return the URI.

        Raises ConfigurationError when there are no S3 credentials (no ``.darkroom`` here and no
        ``DARKROOM_S3_*`` settings), StorageError when the server refuses them or the bucket does not exist,
        TransientError when the server cannot be reached; each message says what to do.
        """
        target = S3Uri.parse(uri)
        data, kind = submission.upload_payload(source, content_type)
        with friendly_storage(str(target), writing=True):
            self.store.put_bytes(target, data, content_type=kind)
        return str(target)

    def download(self, uri: str) -> bytes:
        """The object at ``uri`` (an output image, ``result.json``, ...) as bytes."""
        with friendly_storage(uri):
            return self.store.get_bytes(S3Uri.parse(uri))

    def open_images(self, result: JobResult) -> list[Image]:
        """The result's output images as PIL images (needs Pillow: ``darkroom-producer[images]``)."""
        return [submission.open_image(self.download(uri)) for uri in result.uris]
