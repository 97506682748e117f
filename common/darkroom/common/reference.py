"""Reference tables generated from the code (the documentation site's reference pages).

``scripts/update_reference.py`` writes them into ``docs/reference/``; a test keeps the pages in sync.
``python -m darkroom.common.reference`` prints them.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

from pydantic import BaseModel

from .errors import ErrorCode
from .families import FAMILY_FIELDS, Family
from .jobs import Img2ImgJob, allowed_range
from .settings import Settings

__all__ = ["ERROR_CODE_MEANINGS", "error_codes_markdown", "job_fields_markdown", "metrics_markdown",
           "settings_markdown"]

#: What each code means and whether trying again can help. Every ErrorCode has one (a test checks it).
ERROR_CODE_MEANINGS: dict[ErrorCode, tuple[str, str]] = {
    ErrorCode.INVALID_JOB: ("The job's fields are wrong for this worker (a value outside the operator's limits, "
                            "a feature the model lacks) or a foreign producer's message failed validation.",
                            "fix the job"),
    ErrorCode.INPUT_NOT_FOUND: ("The input image (or IP-Adapter image) does not exist at its s3:// URI.",
                                "upload it, then resubmit"),
    ErrorCode.INPUT_TOO_LARGE: ("The input object is larger than DARKROOM_MAX_IMAGE_BYTES, or decodes to more "
                                "pixels than DARKROOM_MAX_IMAGE_PIXELS.", "send a smaller image"),
    ErrorCode.INPUT_UNREADABLE: ("The input is not an image, or it is corrupt or truncated.", "send a valid image"),
    ErrorCode.INPUT_UNSUPPORTED: ("The image decodes but cannot become RGB, or is under 8 px.", "convert it first"),
    ErrorCode.INPUT_FLAGGED: ("precheck_input was set and the safety checker flagged the input; details hold "
                              "its verdict.", "no"),
    ErrorCode.BUCKET_NOT_ALLOWED: ("The job reads or writes a bucket outside DARKROOM_ALLOWED_BUCKETS.",
                                   "use an allowed bucket"),
    ErrorCode.MODEL_NOT_FOUND: ("The model is not in the worker's registry, or its source holds no model.",
                                "fix the registry or the job"),
    ErrorCode.MODEL_LOAD_FAILED: ("The model's files exist but do not load (wrong architecture, bad scheduler "
                                  "name, corrupt weights).", "fix the model"),
    ErrorCode.MODEL_TOO_LARGE: ("The model's weights exceed the worker's whole memory budget.",
                                "raise DARKROOM_MODEL_MEMORY_BUDGET_BYTES"),
    ErrorCode.ADAPTER_NOT_FOUND: ("A LoRA adapter named by the job does not exist.", "fix the job"),
    ErrorCode.ADAPTER_NOT_ALLOWED: ("The model's registry entry does not allow that adapter, or the worker's "
                                    "settings (fused QKV, compile) rule adapters out.", "fix the job or registry"),
    ErrorCode.ADAPTER_INVALID: ("The adapter file is not a LoRA for this model (or is a pickle).", "fix the file"),
    ErrorCode.EMBEDDING_NOT_FOUND: ("A prompt-embedding or textual-inversion file does not exist.", "fix the job"),
    ErrorCode.EMBEDDING_INVALID: ("An embedding file has the wrong tensors or shape.", "fix the file"),
    ErrorCode.OUTPUT_WRITE_FAILED: ("The outputs could not be written (permissions, missing bucket).",
                                    "fix the output prefix"),
    ErrorCode.TRANSIENT_EXHAUSTED: ("Storage or Redis kept failing through every retry "
                                    "(DARKROOM_TRANSIENT_RETRIES).", "yes, later"),
    ErrorCode.DELIVERY_LIMIT: ("The job's attempts ended without an outcome DARKROOM_MAX_DELIVERIES times (it keeps "
                               "killing workers), or its deliveries broke outside the job "
                               "DARKROOM_MAX_UNEXPECTED_FAILURES times; it is in the dead-letter store with its "
                               "history.", "investigate"),
    ErrorCode.TIMEOUT: ("The job ran past its limit: DARKROOM_JOB_TIME_BASE_SECONDS + DARKROOM_JOB_TIME_FACTOR x "
                        "steps x megapixels x images, at most DARKROOM_JOB_TIME_CEILING_SECONDS.",
                        "smaller job, or raise the limit"),
    ErrorCode.WORKER_FATAL: ("The job made a worker unusable twice (CUDA out of memory, corrupt state); the "
                             "worker restarted each time.", "smaller job, or investigate"),
    ErrorCode.UNAUTHENTICATED: ("The job's signature is missing, stale or wrong for its producer's keys, or it "
                                "names another producer (see Security: producers and isolation).",
                                "sign with a valid key"),
    ErrorCode.NOT_PERMITTED: ("The producer's policy does not allow this (a bucket, prefix, model, adapter, "
                              "priority or size), or the job belongs to another producer.", "fix the job or policy"),
    ErrorCode.QUOTA_EXCEEDED: ("The producer has too many jobs in flight or submitted too many this minute; the "
                               "refusal says when to retry.", "yes, after retry_after"),
    ErrorCode.UPSTREAM_FAILED: ("The job takes its input from another job (a chain) that failed, was not found, "
                                "belongs to another producer or made no image at that index.",
                                "fix or resubmit the upstream job, then this one"),
    ErrorCode.INTERNAL_ERROR: ("An unexpected error; the worker logged its traceback.", "report it"),
}


def _default(model: type[BaseModel], name: str) -> str:
    info = model.model_fields[name]
    if info.is_required():
        return "required"
    if info.default_factory is not None:
        return f"`{info.default_factory()!r}`"  # type: ignore[call-arg]
    value = info.default
    if isinstance(value, Enum):
        value = value.value
    if value is None:
        return "—"
    if hasattr(value, "get_secret_value"):
        return "(secret)"
    return f"`{value}`"


def job_fields_markdown() -> str:
    rows = ["| field | default | allowed | families | meaning |", "| --- | --- | --- | --- | --- |"]
    for name, info in Img2ImgJob.model_fields.items():
        allowed = allowed_range(Img2ImgJob, name) or ""
        families = FAMILY_FIELDS.get(name)
        taken = "all" if families is None else ", ".join(f.value for f in Family if f in families)
        rows.append(f"| `{name}` | {_default(Img2ImgJob, name)} | {allowed} | {taken} | {info.description or ''} |")
    return "\n".join(rows)


def settings_markdown(model: type[BaseModel] = Settings, *, skip: type[BaseModel] | None = None) -> str:
    """``DARKROOM_*`` variables of ``model``, without those ``skip`` already has."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, info in model.model_fields.items():
        if skip is not None and name in skip.model_fields:
            continue
        rows.append(f"| `DARKROOM_{name.upper()}` | {_default(model, name)} | {info.description or ''} |")
    return "\n".join(rows)


def error_codes_markdown() -> str:
    rows = ["| code | meaning | retry? |", "| --- | --- | --- |"]
    for code in ErrorCode:
        meaning, retry = ERROR_CODE_MEANINGS[code]
        rows.append(f"| `{code.value}` | {meaning} | {retry} |")
    return "\n".join(rows)


def metrics_markdown(metrics: Iterable[tuple[str, str, Iterable[str], str]]) -> str:
    """Rows for (name, type, label names, help) of each metric; counters get their ``_total`` suffix."""
    rows = ["| metric | type | labels | meaning |", "| --- | --- | --- | --- |"]
    for name, kind, labels, documentation in sorted(metrics):
        exported = f"{name}_total" if kind == "counter" and not name.endswith("_total") else name
        names = ", ".join(f"`{label}`" for label in labels)
        rows.append(f"| `{exported}` | {kind} | {names} | {documentation} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(job_fields_markdown())
    print()
    print(settings_markdown())
