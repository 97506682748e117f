"""The grid of an augmentation run: sources × prompts × strengths × seeds × adapter sets (× other axes).

:class:`AugmentSpec` is checked before anything is listed or sent: every refusal names the spec field and
item (``strengths[2]=1.5: ...; allowed: 0.0 <= strength <= 1.0``), as :class:`InvalidJobError` does for jobs.
A spec comes from keyword arguments, a small TOML or JSON file (:func:`load_spec_file`), or both.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Self

from annotated_types import MinLen
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from darkroom.common.errors import DarkroomError, FieldError, InvalidJobError
from darkroom.common.jobs import AdapterRef, Img2ImgJob, Priority, field_errors
from darkroom.common.storage import S3Uri

__all__ = ["AXIS_FIELDS", "RESERVED_FIELDS", "AugmentSpec", "InvalidSpecError", "canonical_json", "load_spec_file", "parse_adapter_set",
           "parse_seeds"]

AXIS_FIELDS = {"prompt": "prompts", "strength": "strengths", "seed": "seeds", "adapters": "adapters"}
"""Job fields that have an axis of their own in the spec, and that axis."""
RESERVED_FIELDS = frozenset({"job_id", "model", "image", "output_prefix", "priority"})
"""Job fields the run decides: neither ``fields`` nor ``vary`` nor a manifest column may set them."""
_PROBE = {"model": "m", "image": "s3://probe/p.png", "prompt": "p"}


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: equal values give equal text (hashed into ids)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class AugmentSpec(BaseModel):
    """What to make: every source image × every prompt × strength × seed × adapter set × ``vary`` value.

    ``prompts`` are templates (``str.format``): ``{stem}`` and ``{name}`` of the source file and any column
    of a manifest (``{caption}``); with no prompts, each manifest row's ``prompt`` column is the prompt.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    model: str = Field(description="Model id from the workers' registry.")
    sources: str = Field(description="s3:// prefix of images, a local folder (uploaded first), or a manifest "
                                     "(.jsonl, .csv or .parquet, local or s3://) with an 'image' column.")
    output_prefix: str = Field(description="s3:// prefix of the run: outputs, manifest and run state.")
    prompts: list[Annotated[str, MinLen(1)]] = Field(
        default_factory=list, description="Prompt templates; none: each manifest row's 'prompt'.")
    strengths: Annotated[list[float], MinLen(1)] = Field([0.8], description="Strengths, each a grid axis value.")
    seeds: Annotated[list[int], MinLen(1)] = Field([0], description="Seeds, each a grid axis value.")
    adapters: Annotated[list[list[AdapterRef]], MinLen(1)] = Field(
        [[]], description="Adapter sets ([] = the base model), each a grid axis value.")
    vary: dict[str, Annotated[list[Any], MinLen(1)]] = Field(
        default_factory=dict, description="More axes: job field -> values (e.g. guidance_scale: [5, 7.5]).")
    fields: dict[str, Any] = Field(
        default_factory=dict, description="Job fields the same for every job (e.g. num_inference_steps).")
    inputs_prefix: str | None = Field(
        None, description="Where local images are uploaded; default {output_prefix}/_augment/inputs.")
    priority: Priority = Field(Priority.BULK, description="Queue priority of the run's jobs (bulk by default).")

    @field_validator("output_prefix", "inputs_prefix")
    @classmethod
    def _prefix(cls, v: str | None) -> str | None:
        if v is not None:
            S3Uri.parse(v, allow_empty_key=True)
            return v.rstrip("/")
        return v

    @field_validator("sources")
    @classmethod
    def _sources(cls, v: str) -> str:
        if v.startswith("s3://"):
            S3Uri.parse(v, allow_empty_key=True)
        elif not v:
            raise ValueError("must name an s3:// prefix, a local folder or a manifest file")
        return v

    @model_validator(mode="after")
    def _check_against_job_contract(self) -> Self:
        errors = _axis_errors(self) + _field_errors(self) + _repeats(self) + _overlap(self)
        if errors:
            raise _SpecErrors(errors)
        return self

    @classmethod
    def build(cls, data: dict[str, Any]) -> AugmentSpec:
        """Validate ``data``; raise InvalidJobError naming every bad spec field (``strengths[1]``)."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InvalidSpecError(_spec_errors(exc)) from None

    @property
    def run_id(self) -> str:
        """The run's id: a hash of the whole spec (the same spec, the same run)."""
        return hashlib.sha256(canonical_json(self.model_dump(mode="json")).encode()).hexdigest()[:16]

    @property
    def upload_prefix(self) -> str:
        return self.inputs_prefix or f"{self.output_prefix}/_augment/inputs"

    def axes(self) -> dict[str, list[Any]]:
        """Every axis but the prompt's, job field -> values, in grid order."""
        return {"strength": list(self.strengths), "seed": list(self.seeds),
                "adapters": [[a.model_dump(mode="json") for a in s] for s in self.adapters], **self.vary}

    def describe(self) -> str:
        """``2 prompts × 3 strengths × 4 seeds`` (axes of one value are left out)."""
        sizes = [(len(self.prompts), "prompt"), (len(self.strengths), "strength"), (len(self.seeds), "seed"),
                 (len(self.adapters), "adapter set"), *((len(v), k) for k, v in self.vary.items())]
        parts = [f"{n} {name}s" if n > 1 else "" for n, name in sizes]
        return " × ".join(p for p in parts if p) or "1 job"


class InvalidSpecError(InvalidJobError):
    """Raised when an augmentation spec, or a source or manifest row, is refused; lists every bad field."""

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__(errors)
        lines = "\n".join(f"  - {e}" for e in errors)
        self.args = (f"invalid augmentation spec ({len(errors)} error(s)):\n{lines}",)


class _SpecErrors(DarkroomError, ValueError):
    """Carries field errors out of a validator (pydantic wraps it; :func:`_spec_errors` unwraps it)."""

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors


def _spec_errors(exc: ValidationError) -> list[FieldError]:
    out: list[FieldError] = []
    for err in exc.errors(include_url=False):
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, _SpecErrors):
            out += cause.errors
    return out or field_errors(AugmentSpec, exc)


def _probe(changes: dict[str, Any]) -> list[FieldError]:
    """Errors of a job made of placeholder values and ``changes``."""
    try:
        Img2ImgJob.model_validate({**_PROBE, **changes})
    except ValidationError as exc:
        return field_errors(Img2ImgJob, exc)
    return []


def _renamed(errors: list[FieldError], field: str, where: str, value: Any) -> list[FieldError]:
    """Errors of a probe job, named after the spec item that caused them (``strength`` -> ``strengths[2]``)."""
    out = []
    for e in errors:
        if e.field.startswith(field):
            out.append(FieldError(where + e.field[len(field):], e.value, e.message, e.allowed))
        else:  # a rule across fields (strength × num_inference_steps): show the item, not the whole probe
            out.append(FieldError(where, value, e.message if e.field == "(job)" else f"{e.field}: {e.message}",
                                  e.allowed))
    return out


def _axis_errors(spec: AugmentSpec) -> list[FieldError]:
    errors = _renamed(_probe({"model": spec.model}), "model", "model", spec.model)
    base = {} if _field_errors(spec) else dict(spec.fields)  # bad fields are reported once, below
    axes: dict[str, tuple[str, list[Any]]] = {
        "strengths": ("strength", list(spec.strengths)), "seeds": ("seed", list(spec.seeds)),
        "adapters": ("adapters", [[a.model_dump(mode="json") for a in s] for s in spec.adapters]),
    }
    for field, values in spec.vary.items():
        if field in RESERVED_FIELDS or field in AXIS_FIELDS or field not in Img2ImgJob.model_fields:
            errors.append(_not_settable(f"vary.{field}", field, values))
        else:
            axes[f"vary.{field}"] = (field, values)
    for where, (field, values) in axes.items():
        for i, value in enumerate(values):
            errors += _renamed(_probe({**base, field: value}), field, f"{where}[{i}]", value)
    return errors


def _field_errors(spec: AugmentSpec) -> list[FieldError]:
    settable = {k: v for k, v in spec.fields.items()
                if k not in RESERVED_FIELDS and k not in AXIS_FIELDS and k in Img2ImgJob.model_fields}
    errors = [_not_settable(f"fields.{k}", k, v) for k, v in spec.fields.items() if k not in settable]
    return errors + [FieldError(f"fields.{e.field}", e.value, e.message, e.allowed) for e in _probe(settable)]


def _not_settable(where: str, field: str, value: Any) -> FieldError:
    if field in AXIS_FIELDS:
        return FieldError(where, value, f"{field} has an axis of its own", f"use {AXIS_FIELDS[field]}")
    if field in RESERVED_FIELDS:
        return FieldError(where, value, f"{field} is decided by the run", "any job field but "
                          + ", ".join(sorted(RESERVED_FIELDS | set(AXIS_FIELDS))))
    return FieldError(where, value, "not a job field", "one of " + ", ".join(
        f for f in Img2ImgJob.model_fields if f not in RESERVED_FIELDS and f not in AXIS_FIELDS))


def _repeats(spec: AugmentSpec) -> list[FieldError]:
    """A value given twice on one axis would make the same job twice."""
    errors = []
    named: dict[str, list[Any]] = {
        "prompts": list(spec.prompts), "strengths": list(spec.strengths), "seeds": list(spec.seeds),
        "adapters": [[a.model_dump(mode="json") for a in s] for s in spec.adapters],
        **{f"vary.{k}": v for k, v in spec.vary.items()},
    }
    for where, values in named.items():
        seen: dict[str, int] = {}
        for i, value in enumerate(values):
            key = canonical_json(value)
            if key in seen:
                errors.append(FieldError(f"{where}[{i}]", value, f"repeats {where}[{seen[key]}]",
                                         "each value once per axis"))
            seen.setdefault(key, i)
    return errors


def _overlap(spec: AugmentSpec) -> list[FieldError]:
    """Outputs written under the source prefix would become sources of the next run."""
    if not spec.sources.startswith("s3://") or Path(spec.sources).suffix.lower() in (".jsonl", ".csv", ".parquet"):
        return []
    folder = spec.sources.rstrip("/") + "/"
    if (spec.output_prefix + "/").startswith(folder):
        return [FieldError("output_prefix", spec.output_prefix, f"lies under sources {spec.sources}",
                           "a prefix outside the sources")]
    return []


# -- reading specs from flags and files ----------------------------------------
def load_spec_file(path: str | Path) -> dict[str, Any]:
    """The spec fields in a ``.toml`` or ``.json`` file (validated later, together with the flags)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise InvalidSpecError([FieldError("spec", str(path), f"cannot be parsed: {exc}", "TOML or JSON")]) from None
    if not isinstance(data, dict):
        raise InvalidSpecError([FieldError("spec", str(path), "must hold one table/object of spec fields", None)])
    return data


def parse_seeds(text: str) -> list[int]:
    """``0-3,7`` -> [0, 1, 2, 3, 7]."""
    seeds: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, sep, high = part.partition("-")
        try:
            seeds += list(range(int(low), int(high) + 1)) if sep else [int(part)]
        except ValueError:
            raise InvalidSpecError([FieldError("seeds", text, f"{part!r} is not a seed or a range",
                                              "integers and ranges like 0-3, comma separated")]) from None
    return seeds


def parse_adapter_set(text: str) -> list[dict[str, Any]]:
    """``none`` -> []; ``house-style:0.8+s3://b/ink.safetensors:0.4`` -> two adapters with their weights."""
    if text.strip().lower() in ("", "none", "base"):
        return []
    adapters = []
    for part in text.split("+"):
        uri, sep, weight = part.strip().rpartition(":")
        try:
            adapters.append({"uri": uri, "weight": float(weight)} if sep and uri else {"uri": part.strip()})
        except ValueError:  # a colon that is not a weight (s3://...)
            adapters.append({"uri": part.strip()})
    return adapters
