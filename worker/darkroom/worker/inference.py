"""What the engine thread does with one group of compatible requests: model, adapters, scheduler, call.

Everything here touches pipelines, so it runs on the engine thread only (see :mod:`.batcher`).
Errors shared by the whole group (the model cannot load, an adapter is missing) end every job of
the group; a job's own option that its scheduler or text encoder cannot honour ends that job only;
a failure inside the shared call is tagged batch-wide so the engine retries each job alone.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from darkroom.common.errors import ErrorCode, JobError, ObjectNotFoundError, StorageError
from darkroom.common.storage import S3Uri

from .adapters import AdapterFile
from .batcher import Inference, JobCancelled, Request, mark_batch_wide
from .context import WorkerContext
from .engine import check_call_options, run_batch
from .features import applied, check_embeddings
from .latents import LatentCache
from .registry import ModelSpec

__all__ = ["BatchExecutor"]

log = logging.getLogger(__name__)


class BatchExecutor:
    """Runs one group of :class:`~.batcher.Request` s with equal batch keys as one pipeline call."""

    def __init__(self, ctx: WorkerContext, latents: LatentCache | None = None) -> None:
        self.ctx = ctx
        self.latents = latents
        self._adapter_files: dict[str, AdapterFile] = {}

    def __call__(self, batch: list[Request]) -> list[Inference | BaseException]:
        outcomes: list[Inference | BaseException | None] = [None] * len(batch)
        started = time.monotonic()
        first = batch[0].job
        try:
            t0 = time.perf_counter()
            loaded = self.ctx.models.get(first.model)
            t1 = time.perf_counter()
            wanted = [(self.adapter_file(loaded.spec, ref.uri), ref.weight) for ref in first.adapters]
            activation = loaded.adapters.activate(wanted)
            t2 = time.perf_counter()
            scheduler = loaded.schedulers.use(loaded.pipeline, first.scheduler)  # the job's, or the default
        except Exception as exc:  # noqa: BLE001 - the same model/adapters/scheduler: the same error for all
            return [exc] * len(batch)
        runnable: list[int] = []
        for index, request in enumerate(batch):
            try:
                check_call_options(request.job, loaded.pipeline)
                check_embeddings(request.item, loaded.pipeline)
            except JobError as exc:
                outcomes[index] = exc
            else:
                runnable.append(index)
        requests = [batch[i] for i in runnable]
        if requests:
            t3 = time.perf_counter()
            try:
                with applied(loaded.pipeline, requests[0].item.textual_inversions, requests[0].job.freeu):
                    output = run_batch(loaded.pipeline, [r.item for r in requests], on_step=_fan_out(requests),
                                       latents=self.latents)
            except JobCancelled:
                output = None
            except Exception as exc:  # noqa: BLE001 - retried job by job when it was a batch
                if len(requests) > 1:
                    mark_batch_wide(exc)
                for index in runnable:
                    outcomes[index] = exc
                return [o if o is not None else exc for o in outcomes]
            elapsed = time.perf_counter() - t3
            total_images = sum(r.images for r in requests)
            for position, (index, request) in enumerate(zip(runnable, requests, strict=True)):
                if output is None or request.cancelled:
                    outcomes[index] = JobCancelled(request.job.job_id)
                    continue
                outcomes[index] = Inference(
                    images=output.images[position],
                    latents=None if output.latents is None else output.latents[position],
                    steps_run=output.steps_run,
                    details={
                        "scheduler": type(scheduler).__name__,
                        "scheduler_config": loaded.schedulers.overrides(request.job.scheduler),
                        "model_source": loaded.spec.source,
                        "adapters_resolved": activation.adapters,
                        "batch": {"jobs": len(requests), "images": total_images},
                        "textual_inversions_resolved": [
                            {"token": e.token, "sha256": e.sha256} for e in request.item.textual_inversions],
                    },
                    batch_jobs=len(requests),
                    batch_images=total_images,
                    batch_wait=max(0.0, started - request.enqueued),
                    model_load=t1 - t0,
                    adapters=t2 - t1,
                    inference=elapsed,
                )
        return [o if o is not None else RuntimeError("no outcome") for o in outcomes]

    def adapter_file(self, model: ModelSpec, ref: str) -> AdapterFile:
        """Resolve, fetch once and inspect an adapter reference (cached by path)."""
        source = self.ctx.models.registry.adapter_source(model, ref)
        if source.startswith("s3://"):
            try:
                path = self.ctx.files.fetch_file(S3Uri.parse(source))
            except ObjectNotFoundError:
                raise JobError(ErrorCode.ADAPTER_NOT_FOUND, f"adapter {source} does not exist") from None
            except StorageError as exc:
                raise JobError(ErrorCode.ADAPTER_INVALID, f"adapter {source}: {exc}") from None
            sha = path.parent.name
        else:
            path, sha = Path(source), None
        cached = self._adapter_files.get(str(path))
        if cached is None:
            cached = self._adapter_files[str(path)] = AdapterFile.inspect(path, sha)
        return cached


def _fan_out(requests: list[Request]) -> Any:
    """One step callback for the call: each job's own reporter; stop only when every job is cancelled."""

    def on_step(step: int, total: int) -> None:
        for request in requests:
            if request.cancelled or request.on_step is None:
                continue
            try:
                request.on_step(step, total)
            except JobCancelled:
                request.cancelled = True
        if all(r.cancelled for r in requests):
            raise JobCancelled("every job of the call was cancelled")

    return on_step
