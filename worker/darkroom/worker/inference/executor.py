"""What the engine thread does with one group of compatible requests: model, adapters, scheduler, call.

Everything here touches pipelines, so it runs on the engine thread only (see :mod:`.engine`).
A group whose jobs differ only in their adapters runs as one call routed per sample, or as one call
per adapter set where that cannot apply (:mod:`.mixing`).
Errors shared by the whole group (the model cannot load) end every job of the group; an adapter
that is missing or cannot load ends the jobs that asked for it; a job's own option that its scheduler
or text encoder cannot honour ends that job only; a failure inside the shared call is tagged
batch-wide so the engine retries each job alone.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path
from typing import Any

from darkroom.common.errors import ErrorCode, JobCancelled, JobError, ObjectNotFoundError, StorageError
from darkroom.common.jobs import Img2ImgJob
from darkroom.common.storage import S3Uri

from .. import recompiles
from ..adapters import AdapterFile, AdapterSet
from ..context import WorkerContext
from ..families import check_family
from ..features import applied, check_embeddings
from ..latents import LatentCache
from ..mixing import CallPlan, MixedAdapters, Routing, describe, routed, split
from ..pipelines import LoadedModel
from ..registry import ModelSpec
from .call import check_call_options, run_batch
from .engine import Inference, Request, mark_batch_wide

__all__ = ["BatchExecutor"]

log = logging.getLogger(__name__)


class BatchExecutor:
    """Runs one group of :class:`~.engine.Request` s with equal batch keys as one pipeline call."""

    def __init__(self, ctx: WorkerContext, latents: LatentCache | None = None) -> None:
        self.ctx = ctx
        self.latents = latents
        self.mixing = MixedAdapters(ctx.settings.mixed_adapters)
        self._adapter_files: dict[str, AdapterFile] = {}  # task threads fill it; a race only inspects twice

    def __call__(self, batch: list[Request]) -> list[Inference | BaseException]:
        outcomes: list[Inference | BaseException | None] = [None] * len(batch)
        started = time.monotonic()
        try:
            loaded, model_load, _ = self.ctx.models.use(batch[0].job.model)
        except Exception as exc:  # noqa: BLE001 - the same model: the same error for all
            return [exc] * len(batch)
        sets = {index: request.item.adapters for index, request in enumerate(batch)}
        calls = deque(self.mixing.plan(loaded.spec.id, loaded.pipeline, loaded.adapters, sets))
        while calls:
            call = calls.popleft()
            t1 = time.perf_counter()
            try:
                mixed = call.routing is Routing.MIXED
                activation = (loaded.adapters.activate_mixed(call.distinct) if mixed
                              else loaded.adapters.activate(list(call.sets[0])))
            except Exception as exc:  # noqa: BLE001 - a set that cannot load fails its own jobs only
                if call.routing is Routing.MIXED:  # so run the sets apart, each failing or not on its own
                    calls.extendleft(reversed(split(call, f"the adapter sets could not all be made resident: {exc}")))
                    continue
                for index in call.indices:
                    outcomes[index] = exc
                continue
            routes = dict(zip(call.distinct, activation.routes, strict=True)) if mixed else None
            results = self._run_call([batch[i] for i in call.indices], loaded, call,
                                     None if routes is None else [routes[s] for s in call.sets],
                                     started, model_load, time.perf_counter() - t1)
            for index, outcome in zip(call.indices, results, strict=True):
                outcomes[index] = outcome
        return [o if o is not None else RuntimeError("no outcome") for o in outcomes]

    def _run_call(self, batch: list[Request], loaded: LoadedModel, call: CallPlan, routes: list[str] | None,
                  started: float, model_load: float, adapters: float) -> list[Inference | BaseException]:
        """One pipeline call for the requests of ``call``, their adapters already active (``routes``: per job)."""
        outcomes: list[Inference | BaseException | None] = [None] * len(batch)
        try:
            scheduler = loaded.schedulers.use(loaded.pipeline, batch[0].job.scheduler)  # the job's, or the default
        except Exception as exc:  # noqa: BLE001 - the same scheduler: the same error for all
            return [exc] * len(batch)
        runnable: list[int] = []
        for index, request in enumerate(batch):
            try:
                check_family(request.job, loaded.family)
                check_call_options(request.job, loaded.pipeline)
                check_embeddings(request.item, loaded.pipeline)
            except JobError as exc:
                outcomes[index] = exc
            else:
                runnable.append(index)
        requests = [batch[i] for i in runnable]
        if requests:
            t3 = time.perf_counter()
            names = None if routes is None else [routes[i] for i in runnable for _ in range(batch[i].images)]
            try:
                first = requests[0].item
                with applied(loaded.pipeline, first.textual_inversions, first.job.freeu, first.ip_adapter_scale), \
                        routed(loaded.pipeline, names):
                    output = run_batch(loaded.pipeline, [r.item for r in requests], on_step=_fan_out(requests),
                                       latents=self.latents)
                recompiles.check(loaded.spec.id)
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
            if output is not None:
                loaded.timed_call(elapsed, total_images)
            for position, (index, request) in enumerate(zip(runnable, requests, strict=True)):
                if output is None or request.cancelled:
                    outcomes[index] = JobCancelled(request.job.job_id or "?")
                    continue
                outcomes[index] = Inference(
                    images=output.images[position],
                    latents=None if output.latents is None else output.latents[position],
                    steps_run=output.steps_run,
                    details={
                        "scheduler": type(scheduler).__name__,
                        "scheduler_config": loaded.schedulers.overrides(request.job.scheduler),
                        "model_source": loaded.spec.source,
                        "model_sha256": loaded.weights_sha256,
                        "adapters_resolved": describe(call.sets[index]),
                        "adapter_routing": call.routing.value,
                        **({} if call.reason is None else {"adapter_routing_reason": call.reason}),
                        "batch": {"jobs": len(requests), "images": total_images,
                                  "adapter_sets": len({call.sets[i] for i in runnable})},
                        "textual_inversions_resolved": [
                            {"token": e.token, "sha256": e.sha256} for e in request.item.textual_inversions],
                    },
                    batch_wait=max(0.0, started - request.enqueued),
                    model_load=loaded.load_waited(model_load, request.enqueued),
                    adapters=adapters,
                    inference=elapsed,
                )
        return [o if o is not None else RuntimeError("no outcome") for o in outcomes]

    def resolve_adapters(self, job: Img2ImgJob) -> AdapterSet:
        """The job's adapters as local files with their weights. I/O: called on the job's task thread while it
        prepares, so the engine thread never waits on object storage; a missing adapter fails this job only."""
        if not job.adapters:
            return ()
        model = self.ctx.models.registry.get(job.model)
        return tuple((self.adapter_file(model, ref.uri), ref.weight) for ref in job.adapters)

    def adapter_file(self, model: ModelSpec, ref: str) -> AdapterFile:
        """Resolve, fetch once and inspect an adapter reference (cached by path)."""
        source = self.ctx.models.registry.adapter_source(model, ref)
        if source.startswith("s3://"):
            try:
                path = self.ctx.files.fetch_file(S3Uri.parse(source), max_bytes=self.ctx.files.max_adapter_bytes)
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
            raise JobCancelled("*", message="every job of the call was cancelled")

    return on_step
