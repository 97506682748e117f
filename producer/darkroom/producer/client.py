"""The producer SDK: submit img2img jobs, follow them, fetch their results.

    from darkroom.producer import Client, Img2ImgJob

    with Client.from_env() as client:
        handle = client.submit(Img2ImgJob(model="tiny", image="s3://darkroom/in/cat.png", prompt="a cat"))
        result = handle.wait(timeout=60)
        print(result.uris)

Nothing here imports torch or diffusers.
"""

from __future__ import annotations

import io
import secrets
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from darkroom.common.clients import make_redis, make_s3_client
from darkroom.common.errors import FieldError, InvalidJobError
from darkroom.common.events import JobEvent
from darkroom.common.fleet import Fleet
from darkroom.common.jobs import MAX_SEED, Img2ImgJob, validate_job
from darkroom.common.jobstore import JobRecord, JobStore, job_key
from darkroom.common.objectstore import ObjectStore
from darkroom.common.queues import TASK_IMG2IMG, celery_config
from darkroom.common.results import JobResult
from darkroom.common.settings import Settings
from darkroom.common.storage import S3Uri
from darkroom.common.webhooks import check_callback_url

if TYPE_CHECKING:
    import redis
    from celery import Celery
    from PIL.Image import Image

__all__ = ["Client", "JobHandle"]

EventCallback = Callable[[JobEvent], None]


@dataclass(frozen=True)
class JobHandle:
    """A submitted job. Cheap to create from an id: ``client.handle(job_id)``."""

    job_id: str
    client: Client

    def status(self) -> JobRecord:
        return self.client.status(self.job_id)

    def wait(self, timeout: float | None = None, on_event: EventCallback | None = None) -> JobResult:
        """Block until the job ends; return its result or raise JobFailed / JobCancelled / WaitTimeout."""
        return self.client.wait(self.job_id, timeout=timeout, on_event=on_event)

    def cancel(self) -> JobRecord:
        return self.client.cancel(self.job_id)


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
        self._celery: Celery | None = None
        self.fleet = Fleet(self._redis)

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
        if self._celery is not None:
            self._celery.close()
        self._redis.close()

    # -- submitting ------------------------------------------------------
    def prepare(self, job: Img2ImgJob | Mapping[str, Any]) -> Img2ImgJob:
        """Validate a job and fill what the producer decides: id, seed, output prefix and producer id.

        A ``callback_url`` must resolve to public addresses unless ``allow_private_callbacks`` is set.
        """
        job = validate_job(job if isinstance(job, Img2ImgJob) else dict(job))
        job = job.model_copy(
            update={
                "job_id": job.job_id or uuid.uuid4().hex,
                "seed": job.seed if job.seed is not None else secrets.randbelow(MAX_SEED + 1 - 64),
                "output_prefix": job.output_prefix or self.settings.default_output_prefix.rstrip("/"),
                "producer": job.producer or self.settings.producer_id,
            }
        )
        self._check_buckets(job)
        if job.callback_url is not None:
            try:
                check_callback_url(job.callback_url, allow_private=self.settings.allow_private_callbacks)
            except ValueError as exc:
                allowed = "http(s) URL on a public address (DARKROOM_ALLOW_PRIVATE_CALLBACKS admits private ones)"
                raise InvalidJobError([FieldError("callback_url", job.callback_url, str(exc), allowed)]) from None
        return job

    def submit(self, job: Img2ImgJob | Mapping[str, Any], *, priority: int | None = None) -> JobHandle:
        """Validate, record as ``queued`` and enqueue a job. Raises InvalidJobError for bad input.

        The job goes to its model's queue when a live worker holds the model resident, else to the
        general queue. ``priority`` (0 first .. 9) overrides the job's interactive/bulk priority.
        """
        job = self.prepare(job)
        assert job.job_id is not None
        self.jobs.create(job)
        try:
            self.celery.send_task(
                TASK_IMG2IMG,
                args=[job.model_dump(mode="json")],
                task_id=job.job_id,
                queue=self.fleet.queue_for(job.model),
                priority=job.priority.broker_priority if priority is None else priority,
            )
        except Exception:
            self._redis.delete(job_key(job.job_id))
            raise
        return JobHandle(job.job_id, self)

    def handle(self, job_id: str) -> JobHandle:
        return JobHandle(job_id, self)

    # -- following -------------------------------------------------------
    def status(self, job_id: str) -> JobRecord:
        """The job's current record; raises JobNotFound for unknown (or expired) ids."""
        return self.jobs.require(job_id)

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel a job: a queued one never runs, a running one stops at its next denoising step and
        publishes nothing. A job that already ended is left as it is. Returns the job's record."""
        self.jobs.require(job_id)
        return self.jobs.cancel(job_id)

    def wait(self, job_id: str, timeout: float | None = None, on_event: EventCallback | None = None) -> JobResult:
        """Block until the job ends, waking on its events; return the result or raise its outcome."""
        return self.jobs.wait(job_id, timeout=timeout, on_event=on_event).raise_for_outcome()

    # -- objects ---------------------------------------------------------
    @property
    def store(self) -> ObjectStore:
        if self._s3_client is None:
            self._s3_client = make_s3_client(self.settings)
        return ObjectStore(self._s3_client)

    def upload(self, source: bytes | str | Path | Image, uri: str, *, content_type: str | None = None) -> str:
        """Upload image bytes, a local file or a PIL image (saved as PNG) to ``uri``; return the URI."""
        target = S3Uri.parse(uri)
        if isinstance(source, (str, Path)):
            data, content_type = Path(source).read_bytes(), content_type or _guess_type(str(source))
        elif isinstance(source, bytes):
            data = source
        else:
            buffer = io.BytesIO()
            source.save(buffer, format="PNG")
            data, content_type = buffer.getvalue(), "image/png"
        self.store.put_bytes(target, data, content_type=content_type or "application/octet-stream")
        return str(target)

    def download(self, uri: str) -> bytes:
        return self.store.get_bytes(S3Uri.parse(uri))

    def open_images(self, result: JobResult) -> list[Image]:
        """The result's output images as PIL images (needs Pillow: ``darkroom-producer[images]``)."""
        from PIL import Image as PILImage

        return [PILImage.open(io.BytesIO(self.download(uri))) for uri in result.uris]

    # -- internals -------------------------------------------------------
    @property
    def celery(self) -> Celery:
        if self._celery is None:
            from celery import Celery

            app = Celery("darkroom-producer", set_as_current=False)
            app.conf.update(celery_config(self.settings))
            self._celery = app
        return self._celery

    def _check_buckets(self, job: Img2ImgJob) -> None:
        errors = []
        for name in ("image", "output_prefix"):
            value = getattr(job, name)
            bucket = S3Uri.parse(value, allow_empty_key=True).bucket
            if not self.settings.bucket_allowed(bucket):
                allowed = ", ".join(self.settings.allowed_buckets)
                errors.append(FieldError(name, value, f"bucket {bucket!r} is not allowed", f"buckets {allowed}"))
        if errors:
            raise InvalidJobError(errors)


def _guess_type(name: str) -> str:
    suffix = name.rsplit(".", 1)[-1].lower()
    return {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp"}.get(
        suffix, "application/octet-stream"
    )
