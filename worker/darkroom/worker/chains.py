"""Chains: a job whose input is another job's output (``image = {"job": ID, "index": i}``).

Before a chained job starts, its delivery looks at the upstream job: still queued or running, the
delivery is deferred (the job stays ``queued``, its history says what it waits for); failed or unknown,
the job fails ``upstream_failed``; cancelled, it is cancelled too; succeeded, it runs on the upstream's
output image, which goes through the same reference policy as any input (buckets, quarantine, the
producer's prefixes). A producer chains only from its own jobs.
"""

from __future__ import annotations

from dataclasses import dataclass

from darkroom.common.errors import ErrorCode, JobError
from darkroom.common.jobs import Img2ImgJob
from darkroom.common.jobstore import JobRecord, UnreadableRecord
from darkroom.common.lifecycle import Lifecycle
from darkroom.common.status import JobStatus

__all__ = ["Upstream", "upstream_of", "resolved"]

WAIT_SECONDS = 2.0  # between looks at an upstream job that has not ended


@dataclass(frozen=True)
class Upstream:
    """Where a chained job stands: ``ready`` (run it), ``waiting`` (defer), or ended with ``code``/``reason``
    (``cancelled`` True: cancel it with its upstream)."""

    ready: bool = False
    waiting: bool = False
    cancelled: bool = False
    code: ErrorCode | None = None
    reason: str = ""


def upstream_of(lifecycle: Lifecycle, job: Img2ImgJob, producer: str | None) -> Upstream:
    ref = job.upstream
    if ref is None:
        return Upstream(ready=True)
    try:
        record = lifecycle.read(ref.job)
    except UnreadableRecord:
        record = None
    if record is None:
        return Upstream(code=ErrorCode.UPSTREAM_FAILED,
                        reason=f"upstream job {ref.job} does not exist (never submitted, or its status expired)")
    if record.producer != producer:
        return Upstream(code=ErrorCode.UPSTREAM_FAILED, reason=f"upstream job {ref.job} belongs to another producer")
    if record.status is JobStatus.CANCELLED:
        return Upstream(cancelled=True, reason=f"upstream job {ref.job} was cancelled")
    if record.status is JobStatus.FAILED:
        return Upstream(code=ErrorCode.UPSTREAM_FAILED,
                        reason=f"upstream job {ref.job} failed ({record.error_code}): {record.error_message}")
    if record.status is not JobStatus.SUCCEEDED:
        return Upstream(waiting=True, reason=f"waiting for upstream job {ref.job} ({record.status.value})")
    return Upstream(ready=True)


def resolved(job: Img2ImgJob, upstream: JobRecord | None) -> tuple[Img2ImgJob, bool]:
    """``job`` with its chained input replaced by the upstream output's URI (``job`` itself when not chained),
    and whether that input is latents (``{"latents": true}``) rather than an image."""
    ref = job.upstream
    if ref is None:
        return job, False
    outputs = [] if upstream is None or upstream.result is None else upstream.result.outputs
    if ref.index >= len(outputs):
        raise JobError(ErrorCode.UPSTREAM_FAILED, f"upstream job {ref.job} made {len(outputs)} image(s); "
                                                  f"index {ref.index} is out of range: 0 <= index < {len(outputs)}")
    uri = outputs[ref.index].latents_uri if ref.latents else outputs[ref.index].uri
    if uri is None and ref.latents:
        raise JobError(ErrorCode.UPSTREAM_FAILED, f"upstream job {ref.job} stored no latents for image {ref.index}: "
                                                  "submit it with output_latents=true")
    if uri is None:
        raise JobError(ErrorCode.UPSTREAM_FAILED, f"upstream job {ref.job}'s image {ref.index} was blocked by "
                                                  "its safety check; there is nothing to chain from")
    return job.model_copy(update={"image": uri}), ref.latents
