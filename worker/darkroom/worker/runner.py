"""One job's life on a worker: validate, start, fetch, decode, infer, encode, upload, commit.

Outcomes are kept apart (see :mod:`darkroom.common.errors`): a :class:`JobError`
ends the job ``failed`` with its code; a :class:`TransientError` propagates so
the task can retry later; anything unexpected fails the job with
``internal_error`` and is logged with its traceback. The worker keeps serving.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis

from darkroom.common.errors import (
    ErrorCode,
    InvalidJobError,
    JobError,
    ObjectNotFoundError,
    ObjectTooLargeError,
    StorageError,
    TransientError,
    WorkerFatalError,
)
from darkroom.common.jobs import MAX_SEED, Img2ImgJob, Priority, validate_job
from darkroom.common.jobstore import JobRecord
from darkroom.common.redaction import redact_parameters
from darkroom.common.results import FailureDetails, JobResult, OutputImage, Timings
from darkroom.common.safety import SafetyVerdict
from darkroom.common.status import IllegalTransition, JobStatus
from darkroom.common.storage import S3Uri, latents_uri, output_image_uri, result_uri, thumbnail_uri

from .batcher import BatchPolicy, Engine, JobCancelled, Request
from .context import WorkerContext
from .engine import WorkItem, batch_key
from .faults import Fault, parse_fault
from .features import fetch_embeddings, fetch_textual_inversions
from .images import decode_image, encode_image, encode_latents, fit_to_job
from .inference import BatchExecutor
from .latents import LatentCache, pixel_digest
from .safety import object_metadata, object_tags, public_image
from .screening import InputFlaggedError
from .thumbnails import THUMBNAIL_CONTENT_TYPE, make_thumbnail

__all__ = ["JobRunner"]

log = logging.getLogger(__name__)


@dataclass
class _Stopwatch:
    timings: Timings

    def time(self, stage: str) -> _Stage:
        return _Stage(self.timings, stage)


class _Stage:
    def __init__(self, timings: Timings, stage: str) -> None:
        self.timings, self.stage = timings, stage

    def __enter__(self) -> None:
        self.started = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        elapsed = time.perf_counter() - self.started
        setattr(self.timings, self.stage, getattr(self.timings, self.stage) + elapsed)


class JobRunner:
    """Runs jobs against a :class:`WorkerContext`."""

    def __init__(self, ctx: WorkerContext, engine: Engine | None = None) -> None:
        self.ctx = ctx
        settings = ctx.settings
        self.latents = LatentCache(settings.latent_cache_bytes) if settings.latent_cache_bytes else None
        self.executor = BatchExecutor(ctx, self.latents)
        self.engine = engine or Engine(
            BatchPolicy(max_images=settings.batch_max_images, max_wait=settings.batch_max_wait_ms / 1000,
                        max_pixels=settings.batch_max_pixels),
            self.executor, slots=settings.slots, after_batch=ctx.after_job,
        )
        self._local = threading.local()  # per task thread: the delivery's lease

    @property
    def lease_lost(self) -> Callable[[], bool]:
        """Whether this thread's delivery lost its job's lease (set by the delivery handler)."""
        check: Callable[[], bool] = getattr(self._local, "lease_lost", _never)
        return check

    @lease_lost.setter
    def lease_lost(self, check: Callable[[], bool]) -> None:
        self._local.lease_lost = check

    # -- entry points ----------------------------------------------------
    def run(self, payload: dict[str, Any]) -> JobRecord | None:
        """Run one job message to a terminal state (or raise TransientError to retry it)."""
        started = time.perf_counter()
        job = self._parse(payload)
        if job is None:
            return None
        record = self._start(job)
        if record is None:
            return None
        with self.ctx.running(record.job_id), self.engine.occupied():  # the report names its current jobs
            return self._run_started(record, job, started)

    def _run_started(self, record: JobRecord, job: Img2ImgJob, started: float) -> JobRecord | None:
        timings = Timings(queue_wait=max(0.0, (datetime.now(UTC) - record.created_at).total_seconds()))
        try:
            result = self._execute(record, job, started, timings)
        except JobCancelled:
            log.info("job %s cancelled while running; nothing published", job.job_id)
            return self.ctx.jobs.get(record.job_id)
        except JobError as exc:
            log.info("job %s failed [%s]: %s", job.job_id, exc.code, exc.message)
            timings.total = time.perf_counter() - started
            verdict = exc.verdict if isinstance(exc, InputFlaggedError) else None
            return self.fail(job, exc.code, exc.message, FailureDetails(timings=timings, input_safety=verdict))
        except (TransientError, WorkerFatalError):
            raise
        except (redis.ConnectionError, redis.TimeoutError) as exc:  # Redis restarting: try again later
            raise TransientError(f"Redis unavailable: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - a bad job must not take the worker down
            if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError: the device is in trouble
                raise WorkerFatalError(f"out of device memory: {exc}") from exc
            log.exception("job %s failed unexpectedly", job.job_id)
            return self.fail(job, ErrorCode.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
        self.ctx.jobs_done += 1
        try:
            return self.ctx.jobs.transition(job.job_id or "", JobStatus.SUCCEEDED, job=job, result=result)
        except IllegalTransition:  # cancelled after its outputs were committed
            log.info("job %s ended (cancelled) while committing; its outputs stay recorded in result.json",
                     job.job_id)
            return self.ctx.jobs.get(record.job_id)

    def fail(self, job: Img2ImgJob, code: ErrorCode | str, message: str,
             details: FailureDetails | None = None) -> JobRecord | None:
        try:
            return self.ctx.jobs.transition(
                job.job_id or "", JobStatus.FAILED, job=job, error_code=str(code), error_message=message,
                details=details,
            )
        except IllegalTransition:
            return None

    def requeue(self, payload: dict[str, Any], note: str) -> None:
        """Mark a started job ``queued`` again before a retry."""
        job = self._parse(payload, record_failure=False)
        if job is not None:
            with contextlib.suppress(IllegalTransition):
                self.ctx.jobs.transition(job.job_id or "", JobStatus.QUEUED, job=job, error_message=note)

    # -- stages ----------------------------------------------------------
    def _parse(self, payload: dict[str, Any], *, record_failure: bool = True) -> Img2ImgJob | None:
        try:
            job = validate_job(payload)
        except InvalidJobError as exc:
            job_id = payload.get("job_id") if isinstance(payload, dict) else None
            log.warning("refusing invalid job %s: %s", job_id, exc)
            if record_failure and isinstance(job_id, str) and self.ctx.jobs.get(job_id) is not None:
                record = self.ctx.jobs.require(job_id)
                self.fail(record.job, ErrorCode.INVALID_JOB, str(exc))
            return None
        if job.job_id is None:
            log.warning("refusing a job without job_id")
            return None
        if job.seed is None:
            job = job.model_copy(update={"seed": secrets.randbelow(MAX_SEED + 1 - 64)})
        if job.output_prefix is None:
            job = job.model_copy(update={"output_prefix": self.ctx.settings.default_output_prefix.rstrip("/")})
        return job

    def _start(self, job: Img2ImgJob) -> JobRecord | None:
        assert job.job_id is not None
        current = self.ctx.jobs.get(job.job_id)
        if current is not None and current.status.is_terminal:
            log.info("job %s is already %s; skipping the message", job.job_id, current.status.value)
            return None
        attempt = (current.attempt if current else 0) + 1
        lost = lost_attempts(self.ctx.jobs.history(job.job_id))
        if lost >= self.ctx.settings.max_deliveries:
            self.ctx.jobs.dead_letter(job, f"{lost} attempts ended without an outcome (worker lost each time)")
            log.error("job %s moved to the dead-letter queue after %d lost attempts", job.job_id, lost)
            return None
        self.ctx.jobs.note(job.job_id, "started", attempt=attempt, worker=self.ctx.name)
        try:
            return self.ctx.jobs.transition(
                job.job_id, JobStatus.STARTED, job=job, attempt=attempt, worker=self.ctx.name,
                error_code=None, error_message=None, details=None,
            )
        except IllegalTransition:  # cancelled between the read and the write
            log.info("job %s ended before it started; skipping the message", job.job_id)
            return None

    def _execute(self, record: JobRecord, job: Img2ImgJob, started: float, timings: Timings) -> JobResult:
        clock = _Stopwatch(timings)
        self._check_bucket(job.image, "image")
        self._check_bucket(job.output_prefix or "", "output_prefix")
        ip_scale = self._ip_adapter_scale(job)  # before any download: the model must have an IP-Adapter
        rules = self.ctx.screening.rules(job)
        with self.engine.preparing() as slot:  # fetch and decode while the engine runs other jobs
            with clock.time("download"):
                data = self._fetch_input(job)
            with clock.time("decode"):
                image = decode_image(data, max_pixels=self.ctx.settings.max_image_pixels)
                image = fit_to_job(image, job, limit=self.ctx.settings.max_image_pixels)  # resize_mode, width, ...
            input_safety = None
            if rules.precheck:  # before any model loads or denoising step runs
                with clock.time("safety"):
                    input_safety = self.ctx.screening.check_input(image, rules)
            with clock.time("download"):
                embeds = {name: fetch_embeddings(self.ctx.store, uri, job, name)
                          for name in ("prompt_embeds", "negative_prompt_embeds")
                          if (uri := getattr(job, name)) is not None}
                inversions = fetch_textual_inversions(self.ctx.files, job.textual_inversions)
            with clock.time("adapters"):
                adapters = self.executor.resolve_adapters(job)
            ip_image = None
            if job.ip_adapter_image is not None:
                with clock.time("download"):
                    ip_data = self._fetch_input(job, "ip_adapter_image")
                with clock.time("decode"):
                    ip_image = decode_image(ip_data, max_pixels=self.ctx.settings.max_image_pixels)
            item = WorkItem(job, image, job.seeds(), digest=pixel_digest(image) if self.latents is not None else None,
                            textual_inversions=inversions, adapters=adapters, ip_adapter_image=ip_image,
                            ip_adapter_scale=ip_scale, **embeds)
            fault = parse_fault("\n".join(job.prompts()), self.ctx.settings.fault_injection)
            key = batch_key(item, mixed_adapters=self.executor.mixing.allows(job.model))
            request = Request(item, key, on_step=_ProgressReporter(self.ctx, record, fault),
                              priority=0 if job.priority is Priority.INTERACTIVE else 1)
            inference = slot.infer(request)
        for stage in ("model_load", "adapters", "inference", "batch_wait"):
            setattr(timings, stage, getattr(timings, stage) + getattr(inference, stage))
        if self.ctx.jobs.is_cancelled(record.job_id):
            raise JobCancelled(record.job_id)
        if self.lease_lost():
            raise TransientError("lost the job's lease before publishing; another worker may have taken it over")
        with clock.time("safety"):
            verdicts = self.ctx.screening.judge(inference.images, rules)
        if fault is not None:
            fault.before_upload()
        outputs = self._store_outputs(job, inference.images, item.seeds, verdicts, clock, inference.latents)
        timings.total = time.perf_counter() - started
        result = JobResult(
            job_id=record.job_id,
            model=job.model,
            outputs=outputs,
            result_uri=str(result_uri(job.output_prefix or "", record.job_id)),
            parameters={**redact_parameters(job.model_dump(mode="json")), "steps_run": inference.steps_run, **inference.details,
                        **self._ip_adapter_details(job, ip_scale),
                        "safety_policy": rules.policy.value, "safety_threshold": rules.threshold},
            input_safety=input_safety,
            timings=timings,
            worker=self.ctx.name,
            device=self.ctx.device.device,
            attempt=record.attempt,
            finished_at=datetime.now(UTC),
        )
        return self._commit(result, clock)

    def _fetch_input(self, job: Img2ImgJob, field: str = "image") -> bytes:
        uri = getattr(job, field)
        label = "input" if field == "image" else field
        try:
            return self.ctx.store.get_bytes(S3Uri.parse(uri), max_bytes=self.ctx.settings.max_image_bytes)
        except ObjectNotFoundError:
            raise JobError(ErrorCode.INPUT_NOT_FOUND, f"{label} {uri} does not exist; upload it first") from None
        except ObjectTooLargeError as exc:
            raise JobError(ErrorCode.INPUT_TOO_LARGE, str(exc) if field == "image" else f"{label}: {exc}") from None
        except StorageError as exc:
            raise JobError(ErrorCode.INPUT_NOT_FOUND, f"cannot read {uri}: {exc}") from None

    def _ip_adapter_scale(self, job: Img2ImgJob) -> float | None:
        """The scale a job with an image prompt runs at (its own, else its model's); None without one."""
        if job.ip_adapter_image is None:
            return None
        self._check_bucket(job.ip_adapter_image, "ip_adapter_image")
        spec = self.ctx.models.registry.get(job.model)
        if spec.ip_adapter is None:
            with_one = sorted(m.id for m in self.ctx.models.registry if m.ip_adapter is not None)
            raise JobError(ErrorCode.INVALID_JOB,
                           f"ip_adapter_image needs a model with an IP-Adapter, and model {job.model!r} has none "
                           f"configured (registry: ip_adapter = {{ weights = ..., image_encoder = ... }}); models "
                           f"here with one: {', '.join(with_one) or 'none'}")
        return job.ip_adapter_scale if job.ip_adapter_scale is not None else spec.ip_adapter.scale

    def _ip_adapter_details(self, job: Img2ImgJob, scale: float | None) -> dict[str, Any]:
        """What the result records of the IP-Adapter: the scale applied and the adapter's files."""
        if scale is None:
            return {}
        spec = self.ctx.models.registry.get(job.model).ip_adapter
        assert spec is not None
        return {"ip_adapter_scale": scale, "ip_adapter_resolved": {"weights": spec.weights,
                                                                   "image_encoder": spec.image_encoder}}

    def _store_outputs(self, job: Img2ImgJob, images: list[Any], seeds: list[int], verdicts: list[SafetyVerdict],
                       clock: _Stopwatch, latents: list[Any] | None = None) -> list[OutputImage]:
        return [self._store_output(job, index, image, seed, verdict, clock,
                                   None if latents is None else latents[index])
                for index, (image, seed, verdict) in enumerate(zip(images, seeds, verdicts, strict=True))]

    def _store_output(self, job: Img2ImgJob, index: int, image: Any, seed: int, verdict: SafetyVerdict,
                      clock: _Stopwatch, latents: Any = None) -> OutputImage:
        """Store one image as its verdict says: the original to quarantine when blurred or blocked, then
        the public image (as made, or blurred) unless blocked. Both carry the verdict as metadata and tags."""
        assert job.job_id is not None and job.output_prefix is not None
        metadata = {"job-id": job.job_id, "seed": str(seed), **object_metadata(verdict)}
        quarantine = None
        if verdict.action.quarantines:
            quarantine = self.ctx.screening.quarantine_uri(job.job_id, index, _extension(job))
            self._upload(quarantine, image, job, metadata, object_tags(verdict), clock)
        with clock.time("safety"):
            public = public_image(image, verdict)
        uri = thumb = None
        if public is not None:
            uri = output_image_uri(job.output_prefix, job.job_id, index, _extension(job))
            self._upload(uri, public, job, metadata, object_tags(verdict), clock)
            thumb = thumbnail_uri(job.output_prefix, job.job_id, index)  # of the public image: blurred if blurred
            with clock.time("encode"):
                small = make_thumbnail(public)
            with clock.time("upload"):
                self._put(thumb, small, THUMBNAIL_CONTENT_TYPE, metadata, tags=object_tags(verdict))
        latents_at = None
        if public is not None and latents is not None and job.output_latents:  # never for a blocked image
            latents_at = latents_uri(job.output_prefix, job.job_id, index)
            with clock.time("encode"):
                data = encode_latents(latents, seed)
            with clock.time("upload"):
                self._put(latents_at, data, "application/octet-stream", metadata, tags=object_tags(verdict))
        return OutputImage(index=index, uri=None if uri is None else str(uri), seed=seed, width=image.width,
                           height=image.height, content_type=job.output_format.content_type, nsfw=verdict.flagged,
                           safety=verdict, quarantine_uri=None if quarantine is None else str(quarantine),
                           thumbnail_uri=None if thumb is None else str(thumb),
                           latents_uri=None if latents_at is None else str(latents_at))

    def _upload(self, uri: S3Uri, image: Any, job: Img2ImgJob, metadata: dict[str, str], tags: str,
                clock: _Stopwatch) -> None:
        with clock.time("encode"):
            data = encode_image(image, job.output_format, job.output_quality)
        with clock.time("upload"):
            self._put(uri, data, job.output_format.content_type, metadata, tags=tags)

    def _commit(self, result: JobResult, clock: _Stopwatch) -> JobResult:
        """Write ``result.json`` once (conditional put); if an earlier attempt already did, keep that one."""
        uri = S3Uri.parse(result.result_uri)
        with clock.time("upload"):
            written = self._put(uri, result.model_dump_json(indent=2).encode(), "application/json", {}, if_absent=True)
        if written:
            return result
        log.info("job %s: result already committed by an earlier attempt; keeping it", result.job_id)
        return JobResult.model_validate_json(self.ctx.store.get_bytes(uri))

    def _put(self, uri: S3Uri, data: bytes, content_type: str, metadata: dict[str, str], *,
             if_absent: bool = False, tags: str | None = None) -> bool:
        try:
            return self.ctx.store.put_bytes(uri, data, content_type=content_type, metadata=metadata,
                                            if_absent=if_absent, tags=tags)
        except StorageError as exc:
            raise JobError(ErrorCode.OUTPUT_WRITE_FAILED, f"cannot write {uri}: {exc}") from None

    def _check_bucket(self, uri: str, field: str) -> None:
        bucket = S3Uri.parse(uri, allow_empty_key=True).bucket
        if not self.ctx.settings.bucket_allowed(bucket):
            raise JobError(ErrorCode.BUCKET_NOT_ALLOWED, f"{field} bucket {bucket!r} is not in this worker's allowlist")


def _never() -> bool:
    return False


OUTCOME_EVENTS = frozenset({"finished", "transient", "worker_fatal"})


def lost_attempts(history: list[dict[str, Any]]) -> int:
    """Starts not followed by an outcome: the worker died (or lost Redis) mid-job."""
    events = [e.get("event") for e in history if e.get("event") != "deferred"]
    return sum(1 for i, event in enumerate(events)
               if event == "started" and (i + 1 == len(events) or events[i + 1] not in OUTCOME_EVENTS))


class _ProgressReporter:
    """Publishes throttled progress events (always the last step) and stops cancelled jobs."""

    def __init__(self, ctx: WorkerContext, record: JobRecord, fault: Fault | None = None) -> None:
        self.ctx, self.record, self.fault = ctx, record, fault
        self.last = 0.0

    def __call__(self, step: int, total: int) -> None:
        if self.fault is not None:
            self.fault.at_step(step, self.record.attempt)
        now = time.monotonic()
        if step < total and now - self.last < self.ctx.settings.progress_interval_seconds:
            return
        self.last = now
        try:
            cancelled = self.ctx.jobs.report_progress(self.record, step, total)
        except Exception as exc:  # noqa: BLE001 - progress is best effort
            log.debug("progress event lost: %s", exc)
            return
        if cancelled:
            raise JobCancelled(self.record.job_id)


def _extension(job: Img2ImgJob) -> str:
    return {"png": "png", "jpeg": "jpg", "webp": "webp"}[job.output_format.value]
