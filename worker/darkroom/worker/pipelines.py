"""Loading img2img pipelines and keeping them resident in the worker process.

A :class:`PipelineCache` loads each model once, on first use or at start-up,
and keeps it until evicted (least recently used beyond ``max_models``).
One pipeline is never called from two threads at once (its scheduler holds
state): the worker runs one pipeline call at a time.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from darkroom.common.errors import ErrorCode, JobError, ObjectNotFoundError
from darkroom.common.objectstore import ObjectStore
from darkroom.common.storage import S3Uri

from .device import DeviceInfo
from .registry import ModelRegistry, ModelSpec

if TYPE_CHECKING:
    from diffusers import StableDiffusionImg2ImgPipeline

__all__ = ["LoadedModel", "PipelineCache", "load_pipeline", "fetch_model_folder"]

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A resident pipeline and what we know about it."""

    spec: ModelSpec
    pipeline: StableDiffusionImg2ImgPipeline
    load_seconds: float
    parameter_bytes: int
    uses: int = 0
    last_used: float = field(default_factory=time.monotonic)


def load_pipeline(path: Path, device: DeviceInfo, dtype: str, *, allow_pickle: bool = False) -> Any:
    """Load a diffusers folder as StableDiffusionImg2ImgPipeline on ``device``; local files only."""
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
        str(path),
        torch_dtype=getattr(torch, dtype),
        safety_checker=None,
        requires_safety_checker=False,
        local_files_only=True,
        use_safetensors=None if allow_pickle else True,
    )
    pipe.to(device.torch_device())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameter_bytes(pipeline: Any) -> int:
    total = 0
    for component in pipeline.components.values():
        for tensor in getattr(component, "parameters", lambda: [])():
            total += tensor.numel() * tensor.element_size()
    return total


def fetch_model_folder(uri: str, store: ObjectStore, cache_dir: Path) -> Path:
    """Download an ``s3://`` diffusers folder once into ``cache_dir`` (atomic rename)."""
    root = S3Uri.parse(uri.rstrip("/"), allow_empty_key=True)
    target = cache_dir / hashlib.sha256(str(root).encode()).hexdigest()[:32]
    if (target / "model_index.json").is_file():
        return target
    staging = cache_dir / f".{target.name}.{os.getpid()}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    paginator = store.client.get_paginator("list_objects_v2")
    prefix = root.key + "/" if root.key else ""
    count = 0
    for page in paginator.paginate(Bucket=root.bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            relative = obj["Key"][len(prefix) :]
            if not relative or relative.endswith("/") or ".." in Path(relative).parts:
                continue
            dest = staging / relative
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(store.get_bytes(S3Uri(root.bucket, obj["Key"])))
            count += 1
    if not (staging / "model_index.json").is_file():
        shutil.rmtree(staging, ignore_errors=True)
        raise ObjectNotFoundError(f"{uri} holds no diffusers model (no model_index.json among {count} objects)")
    try:
        staging.rename(target)
    except OSError:  # another process on this host won the race
        shutil.rmtree(staging, ignore_errors=True)
    return target


class PipelineCache:
    """Resident pipelines by model id, least recently used evicted beyond ``max_models``."""

    def __init__(
        self,
        registry: ModelRegistry,
        device: DeviceInfo,
        store: ObjectStore,
        cache_dir: Path,
        *,
        max_models: int = 2,
        allow_pickle: bool = False,
    ) -> None:
        self.registry = registry
        self.device = device
        self.store = store
        self.cache_dir = cache_dir
        self.max_models = max_models
        self.allow_pickle = allow_pickle
        self._resident: OrderedDict[str, LoadedModel] = OrderedDict()

    def get(self, model_id: str) -> LoadedModel:
        """The resident model, loading it (and evicting the least recently used) if needed."""
        spec = self.registry.get(model_id)
        loaded = self._resident.get(model_id)
        if loaded is None:
            loaded = self._load(spec)
            self._evict_for_one_more()
            self._resident[model_id] = loaded
        self._resident.move_to_end(model_id)
        loaded.uses += 1
        loaded.last_used = time.monotonic()
        return loaded

    def is_resident(self, model_id: str) -> bool:
        return model_id in self._resident

    @property
    def resident(self) -> list[str]:
        return list(self._resident)

    def _load(self, spec: ModelSpec) -> LoadedModel:
        started = time.perf_counter()
        try:
            path = fetch_model_folder(spec.source, self.store, self.cache_dir) if spec.is_s3 else Path(spec.source)
            pipeline = load_pipeline(path, self.device, spec.dtype or self.device.dtype, allow_pickle=self.allow_pickle)
        except ObjectNotFoundError as exc:
            raise JobError(ErrorCode.MODEL_NOT_FOUND, f"model {spec.id!r}: {exc}") from exc
        except (OSError, ValueError) as exc:
            raise JobError(ErrorCode.MODEL_LOAD_FAILED, f"model {spec.id!r} from {spec.source}: {exc}") from exc
        seconds = time.perf_counter() - started
        size = parameter_bytes(pipeline)
        log.info("loaded model %s from %s in %.2f s (%d MB)", spec.id, spec.source, seconds, size // 2**20)
        return LoadedModel(spec, pipeline, seconds, size)

    def _evict_for_one_more(self) -> None:
        while len(self._resident) >= self.max_models:
            model_id, _evicted = self._resident.popitem(last=False)
            del _evicted
            gc.collect()
            if self.device.device.startswith("cuda"):
                import torch

                torch.cuda.empty_cache()
            log.info("evicted model %s", model_id)
