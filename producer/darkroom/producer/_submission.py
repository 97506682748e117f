"""What the sync and asyncio clients share: preparing jobs, staging them for Redis, packing uploads.

No I/O happens here: the clients read what it needs (the model catalog, the routes) and run the
pipelines it fills, each with its own Redis client.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from darkroom.common import fairness
from darkroom.common.boundaries import ReferencePolicy
from darkroom.common.broker import task_message
from darkroom.common.errors import ErrorCode, FieldError, InvalidJobError, NotPermitted
from darkroom.common.families import Family, refused_fields
from darkroom.common.identity import AUTH_FIELD, Signer
from darkroom.common.jobs import MESSAGE_SCHEMA_VERSION, Img2ImgJob, Priority, validate_job
from darkroom.common.jobstore import JobRecord, refused_status, stage_create
from darkroom.common.producers import ProducerPolicy, job_namespace
from darkroom.common.queues import TASK_IMG2IMG, cold_queue
from darkroom.common.settings import Settings
from darkroom.common.tenancy import policy_errors
from darkroom.common.webhooks import check_callback_url

if TYPE_CHECKING:
    from PIL.Image import Image

JobLike = Img2ImgJob | Mapping[str, Any]


def chained(job: JobLike, upstream_id: str | None) -> JobLike:
    """``job`` taking output 0 of ``upstream_id`` as its input when it names no ``image`` (the first job of a
    chain keeps its own)."""
    if upstream_id is None:
        return job
    data = job.model_dump(mode="json", exclude_none=True) if isinstance(job, Img2ImgJob) else dict(job)
    if data.get("image") is None:
        data["image"] = {"job": upstream_id, "index": 0}
    return data
UploadSource = bytes | str | Path | Any  # Any: a PIL image
DEFAULT_CHUNK = 500
"""Jobs per Redis round trip in ``submit_many``."""


def prepare(job: JobLike, settings: Settings, known_models: Sequence[str] | Mapping[str, Family | None],
            policy: ProducerPolicy | None = None) -> Img2ImgJob:
    """Validate a job and fill what the producer decides: id, seed, output prefix and producer id.

    ``known_models`` is the fleet's catalog (empty: no worker registered yet, any model passes). A
    ``callback_url`` must resolve to public addresses unless ``allow_private_callbacks`` is set. ``policy``:
    the signing producer's (:mod:`darkroom.common.tenancy`), checked here as the worker will.
    """
    job = validate_job(job if isinstance(job, Img2ImgJob) else dict(job)).seeded()
    job = job.model_copy(
        update={
            "job_id": job.job_id or namespace(settings) + uuid.uuid4().hex,
            "output_prefix": job.output_prefix or settings.default_output_prefix.rstrip("/"),
            "producer": job.producer or settings.producer_id,
        }
    )
    _check_producer(job, settings)
    _check_buckets(job, settings, policy)
    _check_model(job, known_models)
    if job.callback_url is not None:
        _check_callback(job.callback_url, settings)
    return job


def prepare_many(jobs: Iterable[JobLike], settings: Settings, known_models: Sequence[str] | Mapping[str, Family | None],
                 policy: ProducerPolicy | None = None) -> list[Img2ImgJob]:
    """Prepare every job; raise one InvalidJobError naming each bad job's index and fields (``jobs[3].strength``)."""
    prepared: list[Img2ImgJob] = []
    errors: list[FieldError] = []
    first_index: dict[str, int] = {}
    for index, job in enumerate(jobs):
        try:
            ready = prepare(job, settings, known_models, policy)
        except InvalidJobError as exc:
            errors += [FieldError(f"jobs[{index}].{e.field}", e.value, e.message, e.allowed) for e in exc.errors]
            continue
        assert ready.job_id is not None
        if ready.job_id in first_index:
            errors.append(FieldError(f"jobs[{index}].job_id", ready.job_id,
                                     f"repeats jobs[{first_index[ready.job_id]}].job_id; ids must be unique"))
        first_index.setdefault(ready.job_id, index)
        prepared.append(ready)
    if errors:
        raise InvalidJobError(errors)
    return prepared


def signer(settings: Settings) -> Signer | None:
    """The producer's signing key when one is configured (``DARKROOM_PRODUCER_KEY_ID`` and ``_KEY``)."""
    if settings.producer_key is None or not settings.producer_key_id:
        return None
    return Signer(settings.producer_id, settings.producer_key_id, settings.producer_key.get_secret_value())


class Stager:
    """Adds jobs to a (sync or asyncio) pipeline: record, ``queued`` event and broker message, one script each.

    With a ``signer`` each job's message and record carry its signature envelope (:mod:`darkroom.common.identity`).
    """

    def __init__(self, ttl: int, sender: str, signer: Signer | None = None, *, fair: bool = False) -> None:
        self.ttl = ttl
        self.sender = sender
        self.signer = signer
        self.fair = fair

    def stage(
        self, pipe: Any, job: Img2ImgJob, queue: str, priority: int | None = None, *, resubmit: bool = False
    ) -> None:
        """``priority`` (0 first .. 9) overrides the job's interactive/bulk priority; ``resubmit`` replaces a
        job of the same id that ended failed or cancelled (see ``jobstore.stage_create``)."""
        assert job.job_id is not None
        data = job.model_dump(mode="json")
        auth = None if self.signer is None else self.signer.envelope(data)
        signed = {} if auth is None else {AUTH_FIELD: auth}
        held = self.fair and priority is None and job.priority is Priority.BULK  # released by workers, by weight
        message = task_message(
            TASK_IMG2IMG, job.job_id, [{**data, "schema_version": MESSAGE_SCHEMA_VERSION, **signed}],
            queue=cold_queue(job.model) if held else queue,
            priority=job.priority.broker_priority if priority is None else priority, sender=self.sender,
        )
        if held:
            extra = fairness.hold(job.model, job.producer or "default", message[1])
            stage_create(pipe, job, self.ttl, resubmit=resubmit, auth=auth, extra=extra)
        else:
            stage_create(pipe, job, self.ttl, enqueue=message, resubmit=resubmit, auth=auth)


def chunks(jobs: Sequence[Img2ImgJob], size: int) -> Iterable[tuple[int, Sequence[Img2ImgJob]]]:
    """(index of the first job, jobs) per ``size`` jobs."""
    if size < 1:
        raise ValueError(f"chunk must be at least 1, not {size}")
    for start in range(0, len(jobs), size):
        yield start, jobs[start:start + size]


def taken(replies: Sequence[Any], jobs: Sequence[Img2ImgJob], first_index: int | None) -> list[tuple[int | None, str]]:
    """The (index, id) of jobs whose create script wrote nothing: the id existed (and, when resubmitting, its job
    had not failed or been cancelled)."""
    return [
        (None if first_index is None else first_index + i, job.job_id or "")
        for i, (reply, job) in enumerate(zip(replies, jobs, strict=True))
        if refused_status(reply) is not None
    ]


def taken_reason(resubmit: bool) -> str:
    """Why a taken id was refused, for InvalidJobError."""
    if resubmit:
        return "already exists and did not fail or get cancelled; only such jobs are submitted again"
    return "already exists; choose another id or omit it"


# -- objects ------------------------------------------------------------------
def upload_payload(source: UploadSource, content_type: str | None) -> tuple[bytes, str]:
    """Bytes and content type of image bytes, a local file or a PIL image (saved as PNG)."""
    if isinstance(source, (str, Path)):
        return Path(source).read_bytes(), content_type or _guess_type(str(source))
    if isinstance(source, bytes):
        return source, content_type or "application/octet-stream"
    buffer = io.BytesIO()
    source.save(buffer, format="PNG")
    return buffer.getvalue(), "image/png"


def open_image(data: bytes) -> Image:
    """A PIL image of encoded image bytes (needs Pillow: ``darkroom-producer[images]``)."""
    from PIL import Image as PILImage

    return PILImage.open(io.BytesIO(data))


def _guess_type(name: str) -> str:
    suffix = name.rsplit(".", 1)[-1].lower()
    return {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp"}.get(
        suffix, "application/octet-stream"
    )


# -- checks -------------------------------------------------------------------
def _check_buckets(job: Img2ImgJob, settings: Settings, policy: ProducerPolicy | None = None) -> None:
    """Every s3:// reference of the job inside the allowed buckets and outside the quarantine prefix; with a
    producer's policy, everything it limits too."""
    base = ReferencePolicy.from_settings(settings)
    if policy is None:
        base.check_submission(job)
        return
    _, errors = policy_errors(job, policy, base)
    if errors:
        raise InvalidJobError(errors)


def owner(record: JobRecord) -> str | None:
    """Whose job a record is: the producer a worker verified, else the one that signed it, else the job's field."""
    if record.producer is not None:
        return record.producer
    if record.auth is not None and isinstance(record.auth.get("producer"), str):
        return str(record.auth["producer"])
    return record.job.producer if record.job is not None else None


def check_owner(record: JobRecord | None, settings: Settings, action: str) -> None:
    """A signing client reads, cancels and resubmits only its own producer's jobs (NotPermitted)."""
    if record is None or signer(settings) is None:
        return
    found = owner(record)
    if found != settings.producer_id:
        raise NotPermitted(ErrorCode.NOT_PERMITTED, f"job {record.job_id} belongs to producer {found!r}; producer "
                           f"{settings.producer_id!r} may {action} only its own jobs")


def namespace(settings: Settings) -> str:
    """How a signing producer's job ids start (``{id}.``); empty when the client does not sign."""
    return job_namespace(settings.producer_id) if signer(settings) is not None else ""


def _check_producer(job: Img2ImgJob, settings: Settings) -> None:
    """A signing client submits only as its own producer, and only job ids in its namespace (workers refuse
    anything else)."""
    if signer(settings) is None:
        return
    if job.producer != settings.producer_id:
        raise InvalidJobError([FieldError("producer", job.producer, "this client signs as producer "
                                          f"{settings.producer_id!r}; a producer submits only as itself",
                                          settings.producer_id)])
    space = namespace(settings)
    if not (job.job_id or "").startswith(space):
        raise InvalidJobError([FieldError("job_id", job.job_id, f"producer {settings.producer_id!r}'s job ids "
                                          f"start with {space!r}", f"{space}<id>, or omit job_id")])


def _check_model(job: Img2ImgJob, known: Sequence[str] | Mapping[str, Family | None]) -> None:
    """Refuse a model no worker of this fleet has served (once any worker has registered its models), and a
    field the model's family does not take (when the catalog knows its family)."""
    if known and job.model not in known:
        raise InvalidJobError([FieldError("model", job.model, "no worker of this fleet serves this model",
                                          "one of " + ", ".join(known))])
    family = known.get(job.model) if isinstance(known, Mapping) else None
    if family is not None and (errors := refused_fields(job.model_dump(), family, job.model)):
        raise InvalidJobError(errors)


def _check_callback(url: str, settings: Settings) -> None:
    try:
        check_callback_url(url, allow_private=settings.allow_private_callbacks)
    except ValueError as exc:
        allowed = "http(s) URL on a public address (DARKROOM_ALLOW_PRIVATE_CALLBACKS admits private ones)"
        raise InvalidJobError([FieldError("callback_url", url, str(exc), allowed)]) from None
