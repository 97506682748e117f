"""The model registry: which models (and LoRA adapters) a worker serves and where they come from.

A TOML file (``DARKROOM_MODELS_FILE`` or ``darkroom worker --models-file``)::

    [models.sd15]
    source = "/models/stable-diffusion-v1-5"     # a diffusers folder, or "s3://bucket/prefix"
    dtype = "float16"                            # optional; default: the worker's dtype
    scheduler = "EulerDiscreteScheduler"         # optional default scheduler (a diffusers class)
    adapters = ["house-style", "s3://loras/"]    # optional allowlist: adapter ids or s3:// prefixes

    [models.sdxl]
    source = "/models/stable-diffusion-xl-base-1.0"
    family = "sdxl"                              # optional: sd, sdxl, sd3 or flux; default: from model_index.json

    [models.dreamy]
    source = "s3://models/dreamy-v2.safetensors" # a single-file checkpoint (local path or s3://)
    config = "/models/sd15-config"               # a diffusers folder (or s3:// prefix) for its configs and tokenizer

    [models.sd15-ip]
    source = "/models/stable-diffusion-v1-5"

    [models.sd15-ip.ip_adapter]                  # or inline: ip_adapter = { weights = ..., image_encoder = ... }
    weights = "/models/ip-adapter/ip-adapter_sd15.safetensors"   # local or s3://
    image_encoder = "/models/ip-adapter/image_encoder"           # a CLIPVisionModelWithProjection folder
    scale = 0.6                                                  # optional; default 1.0

    [adapters.house-style]
    source = "s3://loras/house-style.safetensors"   # or a local .safetensors file

plus ``--model ID=SOURCE`` flags for quick starts. Relative paths are relative to the file.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from darkroom.common.errors import ConfigurationError, ErrorCode, JobError
from darkroom.common.families import Family, family_of_class
from darkroom.common.jobs import ID_ALLOWED, valid_id
from darkroom.common.storage import InvalidUri, S3Uri

from .checkpoints import is_single_file
from .families import check_single_file

__all__ = ["AdapterSpec", "IPAdapterSpec", "ModelSpec", "ModelRegistry"]

_MODEL_KEYS = {"source", "dtype", "scheduler", "adapters", "config", "ip_adapter", "family"}
_IP_ADAPTER_KEYS = {"weights", "image_encoder", "scale"}
MAX_IP_ADAPTER_SCALE = 2.0  # as jobs may ask (darkroom.common.jobs)


@dataclass(frozen=True)
class IPAdapterSpec:
    """A model's IP-Adapter: its weights file, its CLIP image encoder folder (each local or ``s3://``) and the
    scale jobs get unless they set ``ip_adapter_scale``."""

    weights: str
    image_encoder: str
    scale: float = 1.0


@dataclass(frozen=True)
class ModelSpec:
    """One model id and where to load it from."""

    id: str
    source: str
    dtype: str | None = None
    scheduler: str | None = None
    allowed_adapters: tuple[str, ...] | None = None
    config: str | None = None  # single-file checkpoints: the diffusers folder (or s3:// prefix) with their configs
    ip_adapter: IPAdapterSpec | None = None  # loaded with the model; jobs may then send ip_adapter_image
    family: Family | None = None  # set explicitly, else read from the model's model_index.json (family_of_spec)

    @property
    def is_s3(self) -> bool:
        return self.source.startswith("s3://")

    @property
    def is_single_file(self) -> bool:
        """A whole-pipeline checkpoint file (``.safetensors``; pickle ``.ckpt``/``.pt``/``.bin``) rather than a folder."""
        return is_single_file(self.source)

    def allows(self, adapter_id: str, uri: str) -> bool:
        """Whether a job may use this adapter on this model (no allowlist: any)."""
        if self.allowed_adapters is None:
            return True
        return any(
            entry == adapter_id or (entry.startswith("s3://") and uri.startswith(entry.rstrip("*")))
            for entry in self.allowed_adapters
        )


@dataclass(frozen=True)
class AdapterSpec:
    """A named LoRA adapter file (local path or ``s3://``)."""

    id: str
    source: str


@dataclass
class ModelRegistry:
    """Model and adapter ids to specs; unknown ids are job failures, not crashes."""

    models: dict[str, ModelSpec] = field(default_factory=dict)
    adapters: dict[str, AdapterSpec] = field(default_factory=dict)

    def add(self, spec: ModelSpec) -> None:
        _check_id("model", spec.id)
        if spec.is_single_file:
            _check_single_file(spec)
            if (family := family_of_spec(spec)) is not None:  # an s3:// config: checked when it loads
                try:
                    check_single_file(family, f"model {spec.id!r}: {spec.source}")
                except ValueError as exc:
                    raise ConfigurationError(str(exc)) from None
        elif spec.config is not None:
            raise ConfigurationError(f"model {spec.id!r}: 'config' is only for single-file checkpoints; "
                                     f"{spec.source} is a folder with its own configs")
        elif not spec.is_s3 and not (Path(spec.source) / "model_index.json").is_file():
            raise ConfigurationError(
                f"model {spec.id!r}: {spec.source} is not a diffusers model folder (no model_index.json)"
            )
        if spec.ip_adapter is not None:
            _check_ip_adapter(spec.id, spec.ip_adapter)
        ip = spec.ip_adapter
        sources = {"source": spec.source, "config": spec.config, "ip_adapter weights": ip.weights if ip else None,
                   "ip_adapter image_encoder": ip.image_encoder if ip else None}
        for where, source in sources.items():
            _check_s3_source(f"model {spec.id!r} {where}", source)
        for entry in spec.allowed_adapters or ():
            _check_s3_source(f"model {spec.id!r} adapters entry", entry.removesuffix("*"))
        self.models[spec.id] = spec

    def add_adapter(self, spec: AdapterSpec) -> None:
        _check_id("adapter", spec.id)
        _check_s3_source(f"adapter {spec.id!r} source", spec.source)
        if not spec.source.endswith(".safetensors"):
            raise ConfigurationError(f"adapter {spec.id!r}: {spec.source} is not a .safetensors file")
        if not spec.source.startswith("s3://") and not Path(spec.source).is_file():
            raise ConfigurationError(f"adapter {spec.id!r}: {spec.source} does not exist")
        self.adapters[spec.id] = spec

    def get(self, model_id: str) -> ModelSpec:
        try:
            return self.models[model_id]
        except KeyError:
            known = ", ".join(sorted(self.models)) or "none"
            raise JobError(
                ErrorCode.MODEL_NOT_FOUND, f"model {model_id!r} is not served here; known models: {known}"
            ) from None

    def adapter_source(self, model: ModelSpec, ref: str) -> str:
        """Resolve a job's adapter reference (id or ``s3://`` URI) to a source, checking the allowlist."""
        if ref.startswith("s3://"):
            source, adapter_id = ref, ""
        elif ref in self.adapters:
            source, adapter_id = self.adapters[ref].source, ref
        else:
            known = ", ".join(sorted(self.adapters)) or "none"
            raise JobError(ErrorCode.ADAPTER_NOT_FOUND, f"adapter {ref!r} is not in the registry; known: {known}")
        if not model.allows(adapter_id, source):
            raise JobError(
                ErrorCode.ADAPTER_NOT_ALLOWED,
                f"adapter {ref!r} is not allowed on model {model.id!r}; allowed: {', '.join(model.allowed_adapters or ())}",
            )
        return source

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self.models.values())

    def __len__(self) -> int:
        return len(self.models)

    @property
    def ids(self) -> list[str]:
        return list(self.models)

    def families(self) -> dict[str, Family]:
        """The family of every model whose family is known before loading (see :func:`family_of_spec`)."""
        return {spec.id: family for spec in self if (family := family_of_spec(spec)) is not None}

    @classmethod
    def build(
        cls, file: Path | None = None, pairs: Iterable[str] = (), extra: Mapping[str, str] | None = None
    ) -> ModelRegistry:
        """From a TOML file, ``ID=SOURCE`` pairs and a mapping, later ones overriding."""
        registry = cls()
        if file is not None:
            _read_toml(Path(file), registry)
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


def _read_toml(file: Path, registry: ModelRegistry) -> None:
    try:
        data = tomllib.loads(file.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"cannot read model registry {file}: {exc}") from None
    unknown = set(data) - {"models", "adapters"}
    if unknown:
        raise ConfigurationError(f"{file}: unknown tables {sorted(unknown)}; expected [models.*] and [adapters.*]")
    for adapter_id, table in _tables(data, "adapters", file).items():
        registry.add_adapter(AdapterSpec(adapter_id, _source(table, file, f"adapters.{adapter_id}")))
    models = _tables(data, "models", file)
    if not models:
        raise ConfigurationError(f"{file}: expected one or more [models.<id>] tables")
    for model_id, table in models.items():
        bad = set(table) - _MODEL_KEYS
        if bad:
            raise ConfigurationError(f"{file}: [models.{model_id}] has unknown keys {sorted(bad)}")
        allowed = table.get("adapters")
        if allowed is not None and not (isinstance(allowed, list) and all(isinstance(a, str) for a in allowed)):
            raise ConfigurationError(f"{file}: [models.{model_id}] adapters must be a list of ids or s3:// prefixes")
        config = _resolve(str(table["config"]), file) if "config" in table else None
        ip_adapter = _ip_adapter(table["ip_adapter"], file, model_id) if "ip_adapter" in table else None
        registry.add(ModelSpec(
            model_id, _source(table, file, f"models.{model_id}"), table.get("dtype"), table.get("scheduler"),
            tuple(allowed) if allowed is not None else None, config, ip_adapter, _family(table, file, model_id),
        ))


def _family(table: Mapping[str, Any], file: Path, model_id: str) -> Family | None:
    if "family" not in table:
        return None
    try:
        return Family(str(table["family"]))
    except ValueError:
        raise ConfigurationError(f"{file}: [models.{model_id}] family={table['family']!r}; allowed: "
                                 + ", ".join(f.value for f in Family)) from None


def family_of_folder(folder: Path) -> Family | None:
    """The family named by a diffusers folder's ``model_index.json`` (None: no such file, or a class no
    family runs)."""
    try:
        data = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return None
    return family_of_class(str(data.get("_class_name", ""))) if isinstance(data, dict) else None


def family_of_spec(spec: ModelSpec) -> Family | None:
    """A model's family before it loads: explicit, else its local folder's (or single file's config
    folder's) ``model_index.json``; None for remote sources until loaded."""
    if spec.family is not None:
        return spec.family
    folder = spec.config if spec.is_single_file else spec.source
    if folder is None or folder.startswith("s3://"):
        return None
    return family_of_folder(Path(folder))


def _ip_adapter(table: Any, file: Path, model_id: str) -> IPAdapterSpec:
    where = f"{file}: [models.{model_id}] ip_adapter"
    if not isinstance(table, dict):
        raise ConfigurationError(f"{where} must be a table: {{ weights = ..., image_encoder = ..., scale = 1.0 }}")
    bad = set(table) - _IP_ADAPTER_KEYS
    if bad:
        raise ConfigurationError(f"{where} has unknown keys {sorted(bad)}; allowed: {sorted(_IP_ADAPTER_KEYS)}")
    missing = {"weights", "image_encoder"} - set(table)
    if missing or not all(isinstance(table[k], str) for k in ("weights", "image_encoder")):
        raise ConfigurationError(f"{where} needs 'weights' (a .safetensors file) and 'image_encoder' (a "
                                 "CLIPVisionModelWithProjection folder), each a local path or s3:// URI")
    scale = table.get("scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not 0.0 <= scale <= MAX_IP_ADAPTER_SCALE:
        raise ConfigurationError(f"{where} scale={scale!r}; allowed: 0.0 <= scale <= {MAX_IP_ADAPTER_SCALE}")
    return IPAdapterSpec(_resolve(table["weights"], file), _resolve(table["image_encoder"], file), float(scale))


def _check_ip_adapter(model_id: str, spec: IPAdapterSpec) -> None:
    if not is_single_file(spec.weights):
        raise ConfigurationError(f"model {model_id!r}: IP-Adapter weights {spec.weights} is not a weights file "
                                 "(.safetensors; .bin only with DARKROOM_ALLOW_PICKLE_WEIGHTS=true)")
    if not spec.weights.startswith("s3://") and not Path(spec.weights).is_file():
        raise ConfigurationError(f"model {model_id!r}: IP-Adapter weights {spec.weights} does not exist")
    encoder = spec.image_encoder
    if not encoder.startswith("s3://") and not (Path(encoder) / "config.json").is_file():
        raise ConfigurationError(f"model {model_id!r}: IP-Adapter image_encoder {encoder} is not a "
                                 "CLIPVisionModelWithProjection folder (no config.json)")


def _check_single_file(spec: ModelSpec) -> None:
    if spec.config is None:
        raise ConfigurationError(
            f"model {spec.id!r}: the single-file checkpoint {spec.source} needs a 'config' in the registry file: a "
            "diffusers folder (local or s3://) of the same architecture, e.g. stable-diffusion-v1-5, whose "
            "model_index.json, component configs and tokenizer describe it (its weights are not read)"
        )
    if not spec.is_s3 and not Path(spec.source).is_file():
        raise ConfigurationError(f"model {spec.id!r}: checkpoint file {spec.source} does not exist")
    if not spec.config.startswith("s3://") and not (Path(spec.config) / "model_index.json").is_file():
        raise ConfigurationError(f"model {spec.id!r}: config {spec.config} is not a diffusers folder "
                                 "(no model_index.json)")


def _check_id(kind: str, value: str) -> None:
    """Jobs name models and adapters by id; one a job could not name (or a queue would mangle) is refused."""
    if not valid_id(value):
        raise ConfigurationError(f"{kind} id {value!r} is not an id; allowed: {ID_ALLOWED}")


def _check_s3_source(where: str, source: str | None) -> None:
    """An ``s3://`` source through the same parser as a job's references (folders may end in '/')."""
    if source is None or not source.startswith("s3://"):
        return
    try:
        S3Uri.parse(source, allow_empty_key=True)
    except InvalidUri as exc:
        raise ConfigurationError(f"{where} {exc}; allowed: {exc.allowed}") from None


def _tables(data: dict[str, Any], name: str, file: Path) -> dict[str, dict[str, Any]]:
    tables = data.get(name, {})
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise ConfigurationError(f"{file}: [{name}] must hold [{name}.<id>] tables")
    return tables


def _source(table: dict[str, Any], file: Path, where: str) -> str:
    if "source" not in table:
        raise ConfigurationError(f"{file}: [{where}] needs a 'source'")
    return _resolve(str(table["source"]), file)


def _resolve(source: str, file: Path) -> str:
    """Local paths relative to the registry file; s3:// URIs as they are."""
    if not source.startswith("s3://") and not Path(source).is_absolute():
        source = str(file.parent / source)
    return source
