"""A producer's policy applied to one job: what it may read, write, run, and how large and urgent.

The worker applies it after verifying who signed the job (:class:`~darkroom.common.identity.Gate`, before
any object is read: this is the check that counts); the SDK applies the same rules at submit so that a
producer learns at once. Each refusal names the field, the value and what the policy allows:

- references (inputs, IP-Adapter images, embeddings, adapter and textual-inversion files) only under the
  policy's ``read_prefixes``, outputs only under its ``write_prefixes`` (``not_permitted``), on top of the
  fleet's bucket allowlist and quarantine (:class:`~darkroom.common.boundaries.ReferencePolicy`);
- ``model`` among its ``models``, registry adapters among its ``adapters`` (``not_permitted``,
  ``adapter_not_allowed``);
- ``priority`` no higher than its ``max_priority`` (``not_permitted``);
- images x pixels x steps at most its ``max_job_cost`` (``not_permitted``); the pixels are those the job
  names (``width`` x ``height`` or ``max_pixels``), so a job under a ceiling must name them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from .boundaries import ReferencePolicy, job_references
from .errors import ErrorCode, FieldError
from .jobs import Img2ImgJob, Priority
from .producers import Producer, ProducerPolicy
from .storage import InvalidUri, S3Uri

__all__ = ["PolicyCheck", "job_cost", "policy_errors", "reference_policy"]


def reference_policy(base: ReferencePolicy, policy: ProducerPolicy) -> ReferencePolicy:
    """The fleet's reference policy narrowed to the producer's prefixes (InvalidUri for a malformed one)."""
    def parse(values: list[str]) -> tuple[S3Uri, ...]:
        return tuple(S3Uri.parse(v.rstrip("/"), allow_empty_key=True) for v in values)

    return ReferencePolicy(base.allowed_buckets, base.quarantine, parse(policy.read_prefixes),
                           parse(policy.write_prefixes))


def job_cost(job: Img2ImgJob) -> int | None:
    """images x pixels x steps as the job names them; None when it names no size."""
    if job.width is not None and job.height is not None:
        pixels = job.width * job.height
    elif job.max_pixels is not None:
        pixels = job.max_pixels
    else:
        return None
    return job.num_images_per_prompt * pixels * job.num_inference_steps


def policy_errors(job: Img2ImgJob, policy: ProducerPolicy, base: ReferencePolicy) -> tuple[ErrorCode, list[FieldError]]:
    """Every way ``job`` breaks ``policy`` (and ``base``), with the code of the first; ([]) when it breaks none."""
    found: list[tuple[ErrorCode, FieldError]] = []
    references = reference_policy(base, policy)
    found += [(r.code, r.error) for r in references.refusals(job_references(job))]
    if policy.models and job.model not in policy.models:
        found.append((ErrorCode.NOT_PERMITTED, FieldError("model", job.model, "this producer may not use this model",
                                                          "one of " + ", ".join(policy.models))))
    for i, adapter in enumerate(job.adapters):
        if policy.adapters and not adapter.uri.startswith("s3://") and adapter.uri not in policy.adapters:
            found.append((ErrorCode.ADAPTER_NOT_ALLOWED, FieldError(
                f"adapters.{i}.uri", adapter.uri, "this producer may not use this adapter",
                "one of " + ", ".join(policy.adapters))))
    if policy.max_priority is Priority.BULK and job.priority is Priority.INTERACTIVE:
        found.append((ErrorCode.NOT_PERMITTED, FieldError("priority", job.priority.value,
                                                          "this producer may submit only bulk work", "bulk")))
    if policy.max_job_cost is not None:
        cost = job_cost(job)
        if cost is None or cost > policy.max_job_cost:
            message = ("the job names no size; under a cost ceiling name width and height or max_pixels"
                       if cost is None else f"images x pixels x steps is {cost}, over this producer's ceiling")
            found.append((ErrorCode.NOT_PERMITTED, FieldError("num_inference_steps", job.num_inference_steps, message,
                                                              f"images x pixels x steps <= {policy.max_job_cost}")))
    return (found[0][0] if found else ErrorCode.NOT_PERMITTED), [e for _, e in found]


class PolicyCheck:
    """The worker's check of a verified producer's job (a :class:`~darkroom.common.identity.Gate` hook)."""

    def __init__(self, base: ReferencePolicy) -> None:
        self.base = base

    def __call__(self, producer: Producer, job: Mapping[str, Any]) -> tuple[ErrorCode, str] | None:
        try:
            parsed = Img2ImgJob.model_validate({k: v for k, v in job.items() if k in Img2ImgJob.model_fields})
            code, errors = policy_errors(parsed, producer.policy, self.base)
        except (ValidationError, InvalidUri):
            return None  # not a valid job: validation refuses it next, with the field
        if not errors:
            return None
        return code, f"producer {producer.id!r}'s policy refuses the job: " + "; ".join(str(e) for e in errors)
