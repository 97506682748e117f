"""One job's life on a worker: validate, start, fetch, decode, infer, encode, upload, commit.

Outcomes are kept apart (see :mod:`darkroom.common.errors`): a :class:`JobError`
ends the job ``failed`` with its code; a :class:`TransientError` propagates so
the task can retry later; anything unexpected fails the job with
``internal_error`` and is logged with its traceback. The worker keeps serving.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis

from darkroom.common.errors import (
    ErrorCode,
    JobCancelled,
    JobError,
    LeaseLost,
    ObjectNotFoundError,
    ObjectTooLargeError,
    StorageError,
    TransientError,
    WorkerFatalError,
)
from darkroom.common.jobs import Img2ImgJob, Priority
from darkroom.common.jobstore import JobRecord
from darkroom.common.lifecycle import Fence
from darkroom.common.redaction import redact_parameters
from darkroom.common.results import FailureDetails, JobResult, OutputImage, Timings
from darkroom.common.safety import SafetyVerdict
from darkroom.common.storage import S3Uri, latents_uri, output_image_uri, result_uri, thumbnail_uri

from .chains import resolved
from .context import WorkerContext
from .families import check_family
from .faults import Fault, parse_fault
from .features import fetch_embeddings, fetch_textual_inversions
from .images import decode_image, decode_latents_file, encode_image, encode_latents, fit_to_job, latent_placeholder
from .inference.batching import BatchPolicy
from .inference.call import WorkItem, batch_key
from .inference.engine import Engine, Request
from .inference.executor import BatchExecutor
from .inference.loads import ModelLoads
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
        self.executor = (BatchExecutor(ctx, self.latents) if ctx.simulation is None
                         else ctx.simulation.executor(ctx, self.latents))
        self.engine = engine or Engine(
            BatchPolicy(max_images=settings.batch_max_images, max_wait=settings.batch_max_wait_ms / 1000,
                        max_pixels=settings.batch_max_pixels),
            self.executor, slots=settings.slots, after_batch=ctx.after_job,
            interactive_waiting=lambda: ctx.queues.interactive_waiting(ctx.redis),
            interactive_hold=settings.interactive_hold_ms / 1000,
            loads=ModelLoads.for_worker(settings, ctx.models, ctx.queues),
        )
        ctx.state.watch_engine(lambda: self.engine.busy_since)
        loads = self.engine.loads
        ctx.state.loads = loads  # assist loads a model first through them (darkroom.worker.assist)
        if loads is not None:
            ctx.state.watch_loads(lambda: loads.loading_since)
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
    def run(self, record: JobRecord, fence: Fence) -> JobRecord | None:
        """Run a started attempt of ``record`` to an outcome the lifecycle records; TransientError or
        WorkerFatalError for the delivery to handle; LeaseLost when the fence went stale (nothing written)."""
        started = time.perf_counter()
        assert record.job is not None
        job = self.effective(record.job)
        with self.ctx.state.running(record.job_id), self.engine.occupied():  # the report names its current jobs
            return self._run_started(record, fence, job, started)

    def effective(self, job: Img2ImgJob) -> Img2ImgJob:
        """The job with what the worker decides when the submitter did not: the seed and the output prefix."""
        job = job.seeded()
        if job.output_prefix is None:
            job = job.model_copy(update={"output_prefix": self.ctx.settings.default_output_prefix.rstrip("/")})
        return job

    def time_limit(self, job: Img2ImgJob) -> float:
        """Seconds the job may run: base + factor x steps x megapixels x images, capped by the ceiling."""
        s = self.ctx.settings
        width, height = job.width or 512, job.height or 512
        work = job.num_inference_steps * (width * height / 1e6) * job.num_images_per_prompt
        return min(s.job_time_ceiling_seconds, s.job_time_base_seconds + s.job_time_factor * work)

    def _run_started(self, record: JobRecord, fence: Fence, job: Img2ImgJob, started: float) -> JobRecord | None:
        timings = Timings(queue_wait=max(0.0, (datetime.now(UTC) - record.created_at).total_seconds()))
        stop = _Stop(deadline=time.monotonic() + self.time_limit(job))
        lifecycle = self.ctx.lifecycle
        try:
            result = self._execute(record, fence, job, started, timings, stop)
        except JobCancelled:
            if stop.reason == "stale":
                raise LeaseLost(record.job_id, "the job was taken over while it ran") from None
            if stop.reason == "timeout":
                self.ctx.metrics.timeouts.inc()
                timings.total = time.perf_counter() - started
                return lifecycle.fail(fence, record, ErrorCode.TIMEOUT,
                                      f"ran past its limit of {self.time_limit(job):.0f} s (job_time_* settings)",
                                      FailureDetails(timings=timings))
            log.info("job %s cancelled while running; nothing published", job.job_id)
            return lifecycle.cancelled(fence, record)
        except JobError as exc:
            log.info("job %s failed [%s]: %s", job.job_id, exc.code, exc.message)
            timings.total = time.perf_counter() - started
            verdict = exc.verdict if isinstance(exc, InputFlaggedError) else None
            return lifecycle.fail(fence, record, exc.code, exc.message,
                                  FailureDetails(timings=timings, input_safety=verdict))
        except (TransientError, WorkerFatalError, LeaseLost):
            raise
        except (redis.ConnectionError, redis.TimeoutError) as exc:  # Redis restarting: try again later
            raise TransientError(f"Redis unavailable: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - a bad job must not take the worker down
            if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError: the device is in trouble
                raise WorkerFatalError(f"out of device memory: {exc}") from exc
            log.exception("job %s failed unexpectedly", job.job_id)
            return lifecycle.fail(fence, record, ErrorCode.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
        self.ctx.state.job_done()
        return lifecycle.succeed(fence, record, result)

    # -- stages ----------------------------------------------------------
    def _execute(self, record: JobRecord, fence: Fence, job: Img2ImgJob, started: float, timings: Timings,
                 stop: _Stop) -> JobResult:
        clock = _Stopwatch(timings)
        latent_input = False
        if job.upstream is not None:  # a chain: the upstream's output (it succeeded: see chains) is the input
            job, latent_input = resolved(job, self.ctx.lifecycle.read(job.upstream.job))
        rules = self.ctx.screening.rules(job)  # first: every s3:// reference inside the bucket/quarantine policy
        if (family := self.ctx.models.family_of(job.model)) is not None:
            check_family(job, family)  # before any download (the engine checks again once the model is loaded)
        ip_scale = self._ip_adapter_scale(job)  # before any download: the model must have an IP-Adapter
        with self.engine.preparing() as slot:  # fetch and decode while the engine runs other jobs
            with clock.time("download"):
                data = self._fetch_input(job)
            with clock.time("decode"):
                if latent_input:  # an ensemble's second half: latents, not pixels (nothing to screen or resize)
                    if rules.precheck:
                        raise JobError(ErrorCode.INVALID_JOB, "precheck_input needs an image; this job's input is "
                                                              "its upstream's latents")
                    latents_in = decode_latents_file(data)
                    image = latent_placeholder(latents_in)
                else:
                    latents_in = None
                    image = decode_image(data, max_pixels=self.ctx.settings.max_image_pixels)
                    image = fit_to_job(image, job, limit=self.ctx.settings.max_image_pixels)  # resize_mode, width...
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
            digest = pixel_digest(image) if self.latents is not None and latents_in is None else None
            item = WorkItem(job, image, job.seeds(), digest=digest,
                            textual_inversions=inversions, adapters=adapters, ip_adapter_image=ip_image,
                            ip_adapter_scale=ip_scale, family=self.ctx.models.family_of(job.model),
                            latent_input=latents_in, **embeds)
            fault = parse_fault("\n".join(job.prompts()), self.ctx.settings.fault_injection)
            key = batch_key(item, mixed_adapters=self.executor.mixing.allows(job.model))
            request = Request(item, key, on_step=_ProgressReporter(self.ctx, record, fence, stop, fault),
                              priority=0 if job.priority is Priority.INTERACTIVE else 1)
            inference = slot.infer(request)
        if stop.reason is not None:
            raise JobCancelled(record.job_id)
        for stage in ("model_load", "adapters", "inference", "batch_wait"):
            setattr(timings, stage, getattr(timings, stage) + getattr(inference, stage))
        if self.ctx.jobs.is_cancelled(record.job_id):
            raise JobCancelled(record.job_id)
        self._check_lease(record.job_id)
        with clock.time("safety"):
            verdicts = self.ctx.screening.judge(inference.images, rules)
        if fault is not None:
            fault.before_upload()
        outputs = self._store_outputs(job, fence, inference.images, item.seeds, verdicts, clock, inference.latents)
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
            attempt=fence.attempt,
            submission=fence.submission,
            finished_at=datetime.now(UTC),
        )
        self._check_lease(record.job_id)
        return self._commit(result, fence, clock)

    def _check_lease(self, job_id: str) -> None:
        """Stop early when the lease may have slipped away (the fence is what refuses a stale write)."""
        if self.lease_lost():
            raise LeaseLost(job_id, "lost the job's lease before publishing; another worker may have taken it over")

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

    def _store_outputs(self, job: Img2ImgJob, fence: Fence, images: list[Any], seeds: list[int],
                       verdicts: list[SafetyVerdict], clock: _Stopwatch,
                       latents: list[Any] | None = None) -> list[OutputImage]:
        return [self._store_output(job, fence, index, image, seed, verdict, clock,
                                   None if latents is None else latents[index])
                for index, (image, seed, verdict) in enumerate(zip(images, seeds, verdicts, strict=True))]

    def _store_output(self, job: Img2ImgJob, fence: Fence, index: int, image: Any, seed: int,
                      verdict: SafetyVerdict, clock: _Stopwatch, latents: Any = None) -> OutputImage:
        """Store one image as its verdict says: the original to quarantine when blurred or blocked, then
        the public image (as made, or blurred) unless blocked. Both carry the verdict as metadata and tags."""
        assert job.job_id is not None and job.output_prefix is not None
        run = fence.tag
        metadata = {"job-id": job.job_id, "seed": str(seed), "attempt": run, **object_metadata(verdict)}
        quarantine = None
        if verdict.action.quarantines:
            quarantine = self.ctx.screening.quarantine_uri(job.job_id, index, _extension(job), run)
            self._upload(quarantine, image, job, metadata, object_tags(verdict), clock)
        with clock.time("safety"):
            public = public_image(image, verdict)
        uri = thumb = digest = None
        if public is not None:
            uri = output_image_uri(job.output_prefix, job.job_id, index, _extension(job), run)
            digest = self._upload(uri, public, job, metadata, object_tags(verdict), clock)
            thumb = thumbnail_uri(job.output_prefix, job.job_id, index, run)  # of the public image: blurred if blurred
            with clock.time("encode"):
                small = make_thumbnail(public)
            with clock.time("upload"):
                self._put_once(thumb, small, THUMBNAIL_CONTENT_TYPE, metadata, tags=object_tags(verdict))
        latents_at = None
        if public is not None and latents is not None and job.output_latents:  # never for a blocked image
            latents_at = latents_uri(job.output_prefix, job.job_id, index, run)
            with clock.time("encode"):
                data = encode_latents(latents, seed)
            with clock.time("upload"):
                self._put_once(latents_at, data, "application/octet-stream", metadata, tags=object_tags(verdict))
        return OutputImage(index=index, uri=None if uri is None else str(uri), seed=seed, width=image.width,
                           height=image.height, content_type=job.output_format.content_type, nsfw=verdict.flagged,
                           safety=verdict, quarantine_uri=None if quarantine is None else str(quarantine),
                           thumbnail_uri=None if thumb is None else str(thumb),
                           latents_uri=None if latents_at is None else str(latents_at), sha256=digest)

    def _upload(self, uri: S3Uri, image: Any, job: Img2ImgJob, metadata: dict[str, str], tags: str,
                clock: _Stopwatch) -> str:
        """Encode and store one image under its attempt's own key; returns the SHA-256 of the bytes stored."""
        self._check_lease(job.job_id or "")
        with clock.time("encode"):
            data = encode_image(image, job.output_format, job.output_quality)
        with clock.time("upload"):
            self._put_once(uri, data, job.output_format.content_type, metadata, tags=tags)
        return hashlib.sha256(data).hexdigest()

    def _put_once(self, uri: S3Uri, data: bytes, content_type: str, metadata: dict[str, str], *,
                  tags: str | None = None) -> None:
        """Write an attempt's object only where none exists (``If-None-Match: *``). Keys are unique to the
        fence, so one already there means another process holds the same fence: an attempt number reissued
        by a Redis primary that lost the start in a failover. This attempt then stops without publishing;
        the job runs again under a newer fence."""
        if not self._put(uri, data, content_type, metadata, if_absent=True, tags=tags):
            raise LeaseLost(str(metadata.get("job-id", "?")),
                            f"{uri} already exists: another attempt holds the same fence ({metadata.get('attempt')})")

    def _commit(self, result: JobResult, fence: Fence, clock: _Stopwatch) -> JobResult:
        """Publish ``result.json``, the job's commit pointer, by compare-and-swap on its ETag.

        Written if absent; replaced only when the one there has an older fence (an attempt that lost the job,
        or an earlier submission of this id); kept when it is this attempt's own. A newer fence there means
        this attempt is stale: LeaseLost, nothing published. Whatever a ``result.json`` names was written
        under that attempt's own keys, so its images always match it.
        """
        uri = S3Uri.parse(result.result_uri)
        data = result.model_dump_json(indent=2).encode()
        with clock.time("upload"):
            if self._put(uri, data, "application/json", {}, if_absent=True):
                return result
            for _ in range(10):
                raw, etag = self.ctx.store.get_versioned(uri)
                there = _fence_of(raw)
                if there == fence:
                    return JobResult.model_validate_json(raw)  # our own put, answered late
                if there is not None and there.newer_than(fence):
                    raise LeaseLost(result.job_id, f"a newer attempt ({there.tag}) already published {uri}")
                if self._put(uri, data, "application/json", {}, if_match=etag):
                    log.info("job %s: result.json of attempt %s replaced by %s", result.job_id,
                             "?" if there is None else there.tag, fence.tag)
                    return result
        raise TransientError(f"{uri} kept changing while publishing")

    def _put(self, uri: S3Uri, data: bytes, content_type: str, metadata: dict[str, str], *,
             if_absent: bool = False, if_match: str | None = None, tags: str | None = None) -> bool:
        try:
            return self.ctx.store.put_bytes(uri, data, content_type=content_type, metadata=metadata,
                                            if_absent=if_absent, if_match=if_match, tags=tags)
        except StorageError as exc:
            raise JobError(ErrorCode.OUTPUT_WRITE_FAILED, f"cannot write {uri}: {exc}") from None


def _never() -> bool:
    return False


def _fence_of(raw: bytes) -> Fence | None:
    """The fence a stored ``result.json`` was published with (None if it cannot be read)."""
    try:
        data = json.loads(raw)
        return Fence(str(data.get("submission") or ""), int(data["attempt"]))
    except (ValueError, KeyError, TypeError):
        return None


@dataclass
class _Stop:
    """Why a running job was stopped from its step callback: cancelled, timeout or stale (lease lost)."""

    deadline: float
    reason: str | None = None


class _ProgressReporter:
    """Publishes throttled progress events (always the last step) and stops a job that was cancelled, ran
    past its time limit, or whose attempt is no longer the job's current one."""

    def __init__(self, ctx: WorkerContext, record: JobRecord, fence: Fence, stop: _Stop,
                 fault: Fault | None = None) -> None:
        self.ctx, self.record, self.fence, self.stop, self.fault = ctx, record, fence, stop, fault
        self.last = 0.0

    def __call__(self, step: int, total: int) -> None:
        if self.fault is not None:
            self.fault.at_step(step, self.fence.attempt)
        now = time.monotonic()
        self.ctx.state.progressed(now)
        if now > self.stop.deadline:
            self._halt("timeout")
        if step < total and now - self.last < self.ctx.settings.progress_interval_seconds:
            return
        self.last = now
        try:
            reply = self.ctx.lifecycle.report_progress(self.fence, self.record, step, total)
        except Exception as exc:  # noqa: BLE001 - progress is best effort
            log.debug("progress event lost: %s", exc)
            return
        if reply in ("cancelled", "stale"):
            self._halt(reply)

    def _halt(self, reason: str) -> None:
        self.stop.reason = reason
        raise JobCancelled(self.record.job_id)


def _extension(job: Img2ImgJob) -> str:
    return {"png": "png", "jpeg": "jpg", "webp": "webp"}[job.output_format.value]
