"""Reference tables generated from the code (the README's job-field and settings tables).

``python -m darkroom.common.reference`` prints them; a test keeps the README in sync.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel

from .jobs import Img2ImgJob, allowed_range
from .settings import Settings

__all__ = ["job_fields_markdown", "settings_markdown"]


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
    rows = ["| field | default | allowed | meaning |", "| --- | --- | --- | --- |"]
    for name, info in Img2ImgJob.model_fields.items():
        allowed = allowed_range(Img2ImgJob, name) or ""
        rows.append(f"| `{name}` | {_default(Img2ImgJob, name)} | {allowed} | {info.description or ''} |")
    return "\n".join(rows)


def settings_markdown(model: type[BaseModel] = Settings, *, skip: type[BaseModel] | None = None) -> str:
    """``DARKROOM_*`` variables of ``model``, without those ``skip`` already has."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, info in model.model_fields.items():
        if skip is not None and name in skip.model_fields:
            continue
        rows.append(f"| `DARKROOM_{name.upper()}` | {_default(model, name)} | {info.description or ''} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(job_fields_markdown())
    print()
    print(settings_markdown())
