"""Expanding a spec over its sources into cells, one job each, with ids that depend only on what is made.

A cell's id is ``aug-`` + 24 hex digits of the SHA-256 of the canonical JSON of (source URI, source identity,
output prefix, the cell's job fields). The same source content and parameters always give the same id, so a
rerun finds the jobs it already ran; a changed source (new ETag or version) or parameter gives a new one.
"""

from __future__ import annotations

import hashlib
import itertools
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from darkroom.common.errors import FieldError, InvalidJobError
from darkroom.common.jobs import Img2ImgJob, field_errors

from .sources import Source
from .spec import _PROBE, AXIS_FIELDS, RESERVED_FIELDS, AugmentSpec, InvalidSpecError, canonical_json

__all__ = ["Cell", "cell_id", "expand"]

ID_PREFIX = "aug-"


@dataclass(frozen=True)
class Cell:
    """One point of the grid: a source and the job fields to run on it (model, image, prompt, strength ...)."""

    job_id: str
    source: Source
    params: dict[str, Any]

    def job(self, spec: AugmentSpec) -> dict[str, Any]:
        """The job to submit for this cell."""
        return {**self.params, "job_id": self.job_id, "output_prefix": spec.output_prefix,
                "priority": spec.priority.value}


def cell_id(source: Source, output_prefix: str, params: dict[str, Any], namespace: str = "") -> str:
    """The deterministic job id of a cell (``namespace``: a signing producer's ``{id}.``)."""
    text = canonical_json([source.uri, source.identity, output_prefix, params])
    return namespace + ID_PREFIX + hashlib.sha256(text.encode()).hexdigest()[:24]


def expand(spec: AugmentSpec, sources: Sequence[Source], namespace: str = "") -> list[Cell]:
    """Every cell, in grid order: source, then prompt, then each axis. Raises InvalidJobError naming the source
    row or prompt template at fault (a variable a source lacks, a bad per-row field, two cells alike)."""
    templates = list(spec.prompts) or ["{prompt}"]
    wanted = [_variables(t, f"prompts[{i}]" if spec.prompts else "prompt") for i, t in enumerate(templates)]
    axes = spec.axes()
    errors: list[FieldError] = []
    cells: list[Cell] = []
    seen: dict[str, int] = {}
    base = {"model": spec.model, **spec.fields}
    for index, source in enumerate(sources):
        try:
            row_fields, row_axes = _row_fields(spec, index, source)
        except InvalidJobError as exc:
            errors += exc.errors
            continue
        variables = source.variables
        for t, (template, names) in enumerate(zip(templates, wanted, strict=True)):
            missing = names - variables.keys()
            if missing:
                errors.append(_missing(spec, t, template, source, index, missing, variables))
                continue
            prompt = template.format_map(variables)
            cell_axes = {**axes, **row_axes}
            for combo in itertools.product(*cell_axes.values()):
                params = {**base, **row_fields, "image": source.uri, "prompt": prompt,
                          **dict(zip(cell_axes.keys(), combo, strict=True))}
                job_id = cell_id(source, spec.output_prefix, params, namespace)
                if job_id in seen:
                    errors.append(FieldError(f"sources[{index}]", source.uri, f"prompt template {t} makes the "
                                             f"same job as cell {seen[job_id]} ({prompt!r})", "distinct prompts"))
                    continue
                seen[job_id] = len(cells)
                cells.append(Cell(job_id, source, params))
        if len(errors) >= 20:
            break
    if errors:
        raise InvalidSpecError(errors[:20])
    return cells


def _variables(template: str, where: str) -> frozenset[str]:
    """The names a template uses; only plain ``{name}`` fields are allowed (no attributes or indexes)."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise InvalidSpecError([FieldError(where, template, f"not a valid template: {exc}",
                                          "text with {variables}; {{ and }} for braces")]) from None
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise InvalidSpecError([FieldError(where, template, f"{{{bad[0]}}} is not a plain variable name",
                                          "{name}, {stem} or a manifest column such as {caption}")])
    return frozenset(names)


def _missing(spec: AugmentSpec, t: int, template: str, source: Source, index: int, missing: frozenset[str],
             variables: dict[str, Any]) -> FieldError:
    names = ", ".join("{" + n + "}" for n in sorted(missing))
    if not spec.prompts:
        return FieldError(f"sources[{index}].prompt", source.uri, "this source has no prompt column and the spec "
                          "gives no prompts", "a 'prompt' column in the manifest, or prompts in the spec")
    return FieldError(f"prompts[{t}]", template, f"uses {names}, which source {source.name} lacks",
                      "variables " + ", ".join("{" + v + "}" for v in sorted(variables)))


def _row_fields(spec: AugmentSpec, index: int, source: Source) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """A manifest row's job fields: (fixed fields of this source, axes it pins to its own value)."""
    fields = {k: v for k, v in source.row.items() if k in Img2ImgJob.model_fields and k != "prompt"}
    if not fields:
        return {}, {}
    errors = []
    for name, value in fields.items():
        axis = AXIS_FIELDS.get(name, f"vary.{name}" if name in spec.vary else None)
        if name in RESERVED_FIELDS:
            errors.append(FieldError(f"sources[{index}].{name}", value, f"{name} is decided by the run",
                                     "job fields other than " + ", ".join(sorted(RESERVED_FIELDS))))
        elif axis is not None and len(spec.axes()[name]) > 1:
            errors.append(FieldError(f"sources[{index}].{name}", value, f"the spec varies {name} ({axis})",
                                     f"give {name} either per row or as a spec axis, not both"))
    if errors:
        raise InvalidSpecError(errors)
    try:
        job = Img2ImgJob.model_validate({**_PROBE, **spec.fields, **fields})
    except ValidationError as exc:
        raise InvalidSpecError([FieldError(f"sources[{index}].{e.field}", e.value, e.message, e.allowed)
                               for e in field_errors(Img2ImgJob, exc)]) from None
    normal = job.model_dump(mode="json", include=set(fields))
    pinned = {k: [normal.pop(k)] for k in list(normal) if k in spec.axes()}
    return normal, pinned
