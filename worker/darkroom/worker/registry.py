"""The model registry: which model ids a worker serves and where their weights come from.

A TOML file (``DARKROOM_MODELS_FILE`` or ``darkroom worker --models-file``)::

    [models.sd15]
    source = "/models/stable-diffusion-v1-5"     # a diffusers folder, or "s3://bucket/prefix"
    dtype = "float16"                            # optional; default: the worker's dtype

    [models.tiny]
    source = ".darkroom/models/tiny"

plus ``--model ID=SOURCE`` flags for quick starts.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from darkroom.common.errors import ConfigurationError, ErrorCode, JobError

__all__ = ["ModelSpec", "ModelRegistry"]


@dataclass(frozen=True)
class ModelSpec:
    """One model id and where to load it from."""

    id: str
    source: str
    dtype: str | None = None

    @property
    def is_s3(self) -> bool:
        return self.source.startswith("s3://")


class ModelRegistry:
    """Model ids to specs; unknown ids are job failures, not crashes."""

    def __init__(self, specs: Iterable[ModelSpec] = ()) -> None:
        self._specs: dict[str, ModelSpec] = {}
        for spec in specs:
            self.add(spec)

    def add(self, spec: ModelSpec) -> None:
        if not spec.is_s3 and Path(spec.source).suffix in {".safetensors", ".ckpt"}:
            raise ConfigurationError(
                f"model {spec.id!r}: single-file checkpoints ({spec.source}) are not supported yet; "
                "convert it to a diffusers folder (diffusers' convert_original_stable_diffusion_to_diffusers.py)"
            )
        if not spec.is_s3 and not (Path(spec.source) / "model_index.json").is_file():
            raise ConfigurationError(
                f"model {spec.id!r}: {spec.source} is not a diffusers model folder (no model_index.json)"
            )
        self._specs[spec.id] = spec

    def get(self, model_id: str) -> ModelSpec:
        try:
            return self._specs[model_id]
        except KeyError:
            known = ", ".join(sorted(self._specs)) or "none"
            raise JobError(
                ErrorCode.MODEL_NOT_FOUND, f"model {model_id!r} is not served here; known models: {known}"
            ) from None

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    @property
    def ids(self) -> list[str]:
        return list(self._specs)

    @classmethod
    def build(
        cls, file: Path | None = None, pairs: Iterable[str] = (), extra: Mapping[str, str] | None = None
    ) -> ModelRegistry:
        """From a TOML file, ``ID=SOURCE`` pairs and a mapping, later ones overriding."""
        registry = cls()
        if file is not None:
            for spec in _read_toml(file):
                registry.add(spec)
        for model_id, source in (extra or {}).items():
            registry.add(ModelSpec(model_id, source))
        for pair in pairs:
            model_id, sep, source = pair.partition("=")
            if not sep or not model_id or not source:
                raise ConfigurationError(f"--model wants ID=SOURCE, got {pair!r}")
            registry.add(ModelSpec(model_id, source))
        if not len(registry):
            raise ConfigurationError("no models configured: pass --model ID=SOURCE or --models-file FILE")
        return registry


def _read_toml(file: Path) -> list[ModelSpec]:
    try:
        data = tomllib.loads(Path(file).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"cannot read model registry {file}: {exc}") from None
    models = data.get("models")
    if not isinstance(models, dict) or not models:
        raise ConfigurationError(f"{file}: expected one or more [models.<id>] tables")
    specs = []
    base = Path(file).parent
    for model_id, table in models.items():
        if not isinstance(table, dict) or "source" not in table:
            raise ConfigurationError(f"{file}: [models.{model_id}] needs a 'source'")
        unknown = set(table) - {"source", "dtype"}
        if unknown:
            raise ConfigurationError(f"{file}: [models.{model_id}] has unknown keys {sorted(unknown)}")
        source = str(table["source"])
        if not source.startswith("s3://") and not Path(source).is_absolute():
            source = str(base / source)
        specs.append(ModelSpec(model_id, source, table.get("dtype")))
    return specs
