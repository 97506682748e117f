"""A simulated engine: the real worker with pipelines that only sleep (``darkroom worker --simulate PROFILE``).

Everything around the pipeline stays real: Celery, hot/cold queue routing, leases and the lifecycle,
the batching policy, heartbeats, metrics, result records and output uploads. Three seams are replaced,
each by a subclass that keeps the real policy and changes only what touches torch:

- :class:`SimulatedModels` is a :class:`~.pipelines.PipelineCache` whose load sleeps for the profile's
  load time and whose resident bytes are the profile's bytes per model, so residency, the LRU order and
  eviction by bytes are the real cache's own decisions;
- :class:`SimulatedAdapters` is the real :class:`~.adapters.AdapterManager` (slots, LRU, hot-swaps)
  whose LoRA load sleeps for the profile's adapter load time;
- :class:`SimulatedExecutor` is a :class:`~.inference.executor.BatchExecutor` whose pipeline call sleeps
  ``steps x step time(images, pixels)`` (interpolated from the profile) and returns each job's input image
  as its outputs (so encoding, upload and ``result.json`` are real).

Nothing here imports torch, diffusers or safetensors (a test runs a worker with them blocked), so one box
runs dozens of workers. Adapters are never downloaded: a reference's identity is its URI.

A profile is a JSON or TOML file::

    name = "sd15-h100"
    time_scale = 1.0                    # every sleep is multiplied by this (fleet simulations: < 1)
    memory_budget_bytes = 24_000_000_000
    adapter_load_seconds = 0.35
    [default_model]                     # models the profile does not name
    bytes = 2_200_000_000
    load_seconds = 6.0
    [models.sdxl]
    bytes = 7_000_000_000
    load_seconds = 14.0
    [step_seconds."512x512"]            # per denoising step, by images in the call
    1 = 0.021
    4 = 0.062
    [step_seconds."1024x1024"]
    1 = 0.075

Step time is interpolated linearly in the images of the call within a resolution, then linearly in the
pixels per image across resolutions (extrapolated in proportion beyond the last point).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import socket
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from darkroom.common.clients import make_redis, make_s3_client
from darkroom.common.errors import ConfigurationError, ErrorCode, JobCancelled, JobError
from darkroom.common.jobstore import JobStore
from darkroom.common.objectstore import ObjectStore

from .adapters import AdapterFile, AdapterManager, AdapterSet, set_key
from .context import WorkerContext
from .device import DeviceInfo
from .filecache import FileCache
from .inference.engine import Inference, Request, mark_batch_wide
from .inference.executor import BatchExecutor
from .latents import LatentCache
from .mixing import Routing
from .pipelines import LoadedModel, PipelineCache
from .registry import ModelRegistry, ModelSpec
from .routing import QueueSubscriptions
from .screening import Screening
from .settings import WorkerSettings

__all__ = ["ModelCost", "Profile", "Simulation", "SimulatedAdapters", "SimulatedExecutor", "SimulatedModels",
           "build_context", "simulated_registry"]

log = logging.getLogger(__name__)

SIM_BUCKET = "darkroom-sim"


@dataclass(frozen=True)
class ModelCost:
    """What one model costs: resident bytes and seconds to load."""

    bytes: int
    load_seconds: float


@dataclass(frozen=True)
class Profile:
    """Timings a simulated worker sleeps for (see the module docs for the file format)."""

    step_seconds: dict[int, list[tuple[int, float]]]  # pixels per image -> sorted (images, seconds per step)
    default_model: ModelCost
    models: dict[str, ModelCost] = field(default_factory=dict)
    adapter_load_seconds: float = 0.3
    memory_budget_bytes: int | None = None
    time_scale: float = 1.0
    name: str = "profile"

    @classmethod
    def load(cls, path: Path) -> Profile:
        try:
            text = Path(path).read_text()
            data = tomllib.loads(text) if Path(path).suffix == ".toml" else json.loads(text)
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"cannot read simulation profile {path}: {exc}") from None
        return cls.from_dict(data, where=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "profile") -> Profile:
        unknown = set(data) - {"name", "time_scale", "memory_budget_bytes", "adapter_load_seconds", "default_model",
                               "models", "step_seconds", "recorded"}
        if unknown:
            raise ConfigurationError(f"{where}: unknown keys {sorted(unknown)}; allowed: name, time_scale, "
                                     "memory_budget_bytes, adapter_load_seconds, default_model, models, step_seconds")
        steps: dict[int, list[tuple[int, float]]] = {}
        for size, row in dict(data.get("step_seconds") or {}).items():
            width, sep, height = str(size).partition("x")
            if not sep or not width.isdigit() or not height.isdigit() or not isinstance(row, dict) or not row:
                raise ConfigurationError(f"{where}: step_seconds keys are WIDTHxHEIGHT tables of images -> "
                                         f"seconds, got {size!r}")
            points = sorted((int(images), float(seconds)) for images, seconds in row.items())
            if any(images < 1 or seconds <= 0 for images, seconds in points):
                raise ConfigurationError(f"{where}: step_seconds.{size}: images >= 1 and seconds > 0")
            steps[int(width) * int(height)] = points
        if not steps:
            raise ConfigurationError(f"{where}: step_seconds needs at least one resolution, e.g. "
                                     '{"512x512": {"1": 0.02}}')
        scale = float(data.get("time_scale", 1.0))
        if not 0 < scale <= 100:
            raise ConfigurationError(f"{where}: time_scale={scale}; allowed: 0 < time_scale <= 100")
        budget = data.get("memory_budget_bytes")
        return cls(steps, _cost(data.get("default_model") or {}, f"{where}: default_model"),
                   {m: _cost(c, f"{where}: models.{m}") for m, c in dict(data.get("models") or {}).items()},
                   float(data.get("adapter_load_seconds", 0.3)), int(budget) if budget else None, scale,
                   str(data.get("name", Path(where).stem)))

    def cost(self, model_id: str) -> ModelCost:
        return self.models.get(model_id, self.default_model)

    def step_time(self, images: int, pixels: int) -> float:
        """Seconds per denoising step of a call with ``images`` samples of ``pixels`` pixels each (unscaled)."""
        sizes = sorted(self.step_seconds)
        at = {size: _interpolate(self.step_seconds[size], images) for size in sizes}
        if len(sizes) == 1:
            return at[sizes[0]] * pixels / sizes[0]
        index = min(max(bisect.bisect_left(sizes, pixels), 1), len(sizes) - 1)
        lo, hi = sizes[index - 1], sizes[index]
        if pixels > hi:  # beyond the largest: in proportion to pixels
            return at[hi] * pixels / hi
        if pixels < lo:
            return at[lo] * max(pixels, 1) / lo
        return at[lo] + (at[hi] - at[lo]) * (pixels - lo) / (hi - lo)

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds * self.time_scale)


def _cost(table: Any, where: str) -> ModelCost:
    if not isinstance(table, dict):
        raise ConfigurationError(f"{where}: a table with bytes and load_seconds")
    cost = ModelCost(int(table.get("bytes", 2_000_000_000)), float(table.get("load_seconds", 5.0)))
    if cost.bytes < 1 or cost.load_seconds < 0:
        raise ConfigurationError(f"{where}: bytes >= 1 and load_seconds >= 0")
    return cost


def _interpolate(points: list[tuple[int, float]], images: int) -> float:
    """Linear in images between recorded batch sizes; beyond them, the nearest segment's slope (or in proportion)."""
    if len(points) == 1:
        return points[0][1] * images / points[0][0] if images > points[0][0] else points[0][1]
    xs = [p[0] for p in points]
    index = min(max(bisect.bisect_left(xs, images), 1), len(points) - 1)
    (x0, y0), (x1, y1) = points[index - 1], points[index]
    value = y0 + (y1 - y0) * (images - x0) / (x1 - x0)
    return max(value, points[0][1] * 0.5)


class SimulatedDevice(DeviceInfo):
    """A device that reports what the profile says and never asks torch."""

    def free_memory(self) -> int | None:
        return None


class SimulatedPipeline:
    """What stands for a diffusers pipeline: its bytes, and LoRA loads that sleep."""

    scheduler = None
    unet = None
    text_encoder = None

    def __init__(self, model_id: str, nbytes: int, profile: Profile) -> None:
        self.model_id = model_id
        self.nbytes = nbytes
        self.profile = profile

    def load_lora_weights(self, path: str, adapter_name: str, hotswap: bool = False) -> None:
        self.profile.sleep(self.profile.adapter_load_seconds)

    def delete_adapters(self, names: list[str]) -> None:
        return None


class SimulatedAdapters(AdapterManager):
    """The real adapter slots (LRU, hot-swap) on a :class:`SimulatedPipeline`; no LoRA layers to walk."""

    def _layers(self) -> list[Any]:
        return []


class SimulatedModels(PipelineCache):
    """The real pipeline cache (LRU by bytes, hits, misses, evictions) whose loads only sleep."""

    def __init__(self, registry: ModelRegistry, device: DeviceInfo, files: FileCache, profile: Profile, *,
                 budget_bytes: int, max_adapters: int = 8) -> None:
        super().__init__(registry, device, files, budget_bytes=budget_bytes, max_adapters=max_adapters)
        self.profile = profile

    def resident_bytes(self) -> int:
        return sum(entry.pipeline.nbytes for entry in self.entries().values() if entry.pipeline is not None)

    def _load(self, spec: ModelSpec) -> LoadedModel:
        cost = self.profile.cost(spec.id)
        if cost.bytes > self.budget_bytes:
            raise JobError(ErrorCode.MODEL_TOO_LARGE,
                           f"model {spec.id!r} needs about {cost.bytes} bytes; the budget is {self.budget_bytes}")
        self._make_room(cost.bytes)
        started = time.perf_counter()
        self.profile.sleep(cost.load_seconds)
        pipeline = SimulatedPipeline(spec.id, cost.bytes, self.profile)
        seconds = time.perf_counter() - started
        log.info("loaded model %s (simulated: %d MB in %.2f s)", spec.id, cost.bytes // 2**20, seconds)
        return LoadedModel(spec, pipeline, SimulatedAdapters(pipeline, max_slots=self.max_adapters),
                           Path("/simulated") / spec.id, seconds,
                           weights_sha256=hashlib.sha256(f"simulated:{spec.id}".encode()).hexdigest())


class SimulatedExecutor(BatchExecutor):
    """Runs a group like :class:`BatchExecutor` (model through the cache, adapter sets through the slots, one
    call per adapter set) but the call sleeps for the profile's step time and returns the inputs."""

    def __init__(self, ctx: WorkerContext, profile: Profile, latents: LatentCache | None = None) -> None:
        super().__init__(ctx, latents)
        self.profile = profile
        self.mixing.enabled = False  # one call per adapter set: the batch key keeps the adapters

    def __call__(self, batch: list[Request]) -> list[Inference | BaseException]:
        started = time.monotonic()
        since = time.time()  # wall clock: the fleet simulator lines calls up with submission times
        try:
            loaded, model_load, fresh = self.ctx.models.use(batch[0].job.model)
        except Exception as exc:  # noqa: BLE001 - the same model: the same error for all
            return [exc] * len(batch)
        model_loads = int(fresh)
        beside = loaded.loaded_span if fresh and loaded.loaded_span is not None else None
        outcomes: list[Inference | BaseException | None] = [None] * len(batch)
        groups: dict[str | None, list[int]] = {}
        for index, request in enumerate(batch):
            groups.setdefault(set_key(request.item.adapters), []).append(index)
        for indices in groups.values():
            adapters: AdapterSet = batch[indices[0]].item.adapters
            t1 = time.perf_counter()
            try:
                activation = loaded.adapters.activate(list(adapters))
            except Exception as exc:  # noqa: BLE001 - a set that cannot load fails its own jobs only
                for index in indices:
                    outcomes[index] = exc
                continue
            switch = time.perf_counter() - t1
            counts = {"model_loads": model_loads, "adapter_loads": activation.loaded + activation.hotswapped}
            model_loads = 0
            for index, outcome in zip(indices, self._call([batch[i] for i in indices], loaded, activation.adapters,
                                                          started, model_load, switch, counts, since, beside),
                                      strict=True):
                outcomes[index] = outcome
            since = time.time()
        return [o if o is not None else RuntimeError("no outcome") for o in outcomes]

    def _call(self, requests: list[Request], loaded: LoadedModel, adapters: list[dict[str, Any]], started: float,
              model_load: float, switch: float, counts: dict[str, int], since: float,
              beside: tuple[float, float] | None = None) -> list[Inference | BaseException]:
        """One simulated call; the first job's details carry the call's counts (``sim``: loads and busy
        seconds of the call, once per call so that a fleet's totals add up); every job's carry the call's
        wall-clock span (``busy_from``: the call's model load or adapter switch began, ``denoise_from``: its
        steps began, ``busy_to``: it ended) and, for the first call after a load beside the engine, that load's
        span (``load_from``, ``load_to``)."""
        job = requests[0].job
        images = sum(r.images for r in requests)
        width, height = requests[0].item.image.size
        steps = max(1, job.steps_to_run)
        per_step = self.profile.step_time(images, width * height)
        t0, denoise_from = time.perf_counter(), time.time()
        try:
            for step in range(1, steps + 1):
                self.profile.sleep(per_step)
                for request in requests:
                    if not request.cancelled and request.on_step is not None:
                        try:
                            request.on_step(step, steps)
                        except JobCancelled:
                            request.cancelled = True
                if all(r.cancelled for r in requests):
                    break
        except Exception as exc:  # noqa: BLE001 - as the real call: retried job by job when it was a batch
            if len(requests) > 1:
                mark_batch_wide(exc)
            return [exc] * len(requests)
        elapsed = time.perf_counter() - t0
        loaded.timed_call(elapsed, images)
        until = time.time()
        results: list[Inference | BaseException] = []
        for position, request in enumerate(requests):
            first = position == 0
            if request.cancelled:
                results.append(JobCancelled(request.job.job_id or "?"))
                continue
            results.append(Inference(
                images=[request.item.image.copy() for _ in request.item.seeds],
                steps_run=steps,
                details={"simulated": self.profile.name, "model_source": loaded.spec.source,
                         "model_sha256": loaded.weights_sha256, "adapters_resolved": adapters,
                         "adapter_routing": (Routing.SINGLE if len(requests) == 1 else Routing.IDENTICAL).value,
                         "batch": {"jobs": len(requests), "images": images, "adapter_sets": 1},
                         "step_seconds": per_step * self.profile.time_scale,
                         "sim": {"model_loads": counts["model_loads"] if first else 0,
                                 "adapter_loads": counts["adapter_loads"] if first else 0,
                                 "call_seconds": elapsed if first else 0.0,
                                 "load_seconds": (model_load if counts["model_loads"] else 0.0) if first else 0.0,
                                 "busy_from": since, "busy_to": until, "denoise_from": denoise_from, "first": first,
                                 **({} if beside is None else {"load_from": beside[0], "load_to": beside[1]})}},
                batch_wait=max(0.0, started - request.enqueued),
                model_load=loaded.load_waited(model_load, request.enqueued), adapters=switch,
                inference=elapsed,
            ))
        return results

    def adapter_file(self, model: ModelSpec, ref: str) -> AdapterFile:
        """The reference as an adapter (allowlist checked as for real; nothing fetched: its URI is its identity)."""
        source = self.ctx.models.registry.adapter_source(model, ref)
        cached = self._adapter_files.get(source)
        if cached is None:
            digest = hashlib.sha256(source.encode()).hexdigest()
            cached = self._adapter_files[source] = AdapterFile(Path(source.rsplit("/", 1)[-1] or "lora"), digest,
                                                               unet_only=True, signature="simulated")
        return cached


@dataclass(frozen=True)
class Simulation:
    """What ``--simulate`` gives the worker: the profile, and the executor it runs jobs with."""

    profile: Profile

    def executor(self, ctx: WorkerContext, latents: LatentCache | None = None) -> SimulatedExecutor:
        return SimulatedExecutor(ctx, self.profile, latents)


def simulated_registry(profile: Profile, registry: ModelRegistry | None = None) -> ModelRegistry:
    """The registry the worker serves: the one given, else the profile's models (sources are never read)."""
    if registry is not None and len(registry):
        return registry
    if not profile.models:
        raise ConfigurationError("no models to simulate: name them in the profile ([models.ID]) or pass "
                                 "--model ID=SOURCE / --models-file")
    built = ModelRegistry()
    for model_id in profile.models:
        built.add(ModelSpec(model_id, f"s3://{SIM_BUCKET}/models/{model_id}/"))
    return built


def build_context(settings: WorkerSettings, registry: ModelRegistry, profile: Profile) -> WorkerContext:
    """A :class:`WorkerContext` like :meth:`WorkerContext.build`, with the simulated device, cache and executor.

    The safety checker is ``none`` (its model would need torch or onnxruntime in every process)."""
    budget = settings.model_memory_budget_bytes or profile.memory_budget_bytes or 24 * 2**30
    settings = settings.model_copy(update={"safety_checker": "none"})
    device = SimulatedDevice("sim", "float16", f"simulated ({profile.name}, x{profile.time_scale:g})", budget)
    client = make_redis(settings)
    store = ObjectStore(make_s3_client(settings))
    files = FileCache(settings.state_dir / "cache", store, budget_bytes=settings.file_cache_bytes or None,
                      max_adapter_bytes=settings.max_adapter_bytes)
    models = SimulatedModels(registry, device, files, profile, budget_bytes=budget, max_adapters=settings.max_adapters)
    screening = Screening.from_settings(settings, registry, device="cpu")
    name = settings.worker_name or f"darkroom-sim-{socket.gethostname()}-{os.getpid()}"
    return WorkerContext(settings, name, device, client, JobStore(client, ttl_seconds=settings.status_ttl_seconds),
                         store, files, models, screening=screening, queues=QueueSubscriptions(registry.ids),
                         simulation=Simulation(profile))

