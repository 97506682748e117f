"""Loading img2img pipelines and keeping them resident within a memory budget.

:class:`PipelineCache` keeps loaded models until the bytes of their weights
(measured from the loaded tensors, not counted in models) would exceed the
budget; then the least recently used model is evicted and its memory released.
A component that is byte-identical between models (typically the VAE, which
many fine-tunes share) is loaded once and shared (not with CPU offload, whose
hooks are per pipeline). UNets and text encoders are never shared, because LoRA
adapters are injected into them per model.

A model is a diffusers folder or a single-file checkpoint (see :mod:`.checkpoints`),
local or ``s3://``. Every pipeline gets the worker's :class:`~.tuning.Tuning`
(attention, VAE slicing/tiling, fused QKV, channels-last, compile, offload) as it loads.

One pipeline is never called from two threads at once (its scheduler holds
state): the worker runs one pipeline call at a time. A model may load *beside*
the engine (:meth:`PipelineCache.load_beside`, on the loader thread of
:mod:`.inference.loads`) while the engine calls another one: the engine claims the
model of each call (:meth:`PipelineCache.claim`), and a load that must make room
marks its victims as leaving (never claimed again) and evicts each one only once
its call has ended.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from darkroom.common.errors import ConfigurationError, ErrorCode, JobError, ObjectNotFoundError, StorageError
from darkroom.common.families import Family, family_of_class, img2img_class
from darkroom.common.storage import S3Uri

from .adapters import AdapterManager
from .checkpoints import PICKLE_SUFFIXES, load_single_file
from .device import DeviceInfo, resolve_dtype
from .families import check_single_file
from .filecache import FileCache, sha256_file
from .ip_adapter import IPAdapterFiles, load_ip_adapter
from .registry import ModelRegistry, ModelSpec, family_of_folder, family_of_spec
from .schedulers import SchedulerSwitch
from .slotted import SlotAdapters
from .tuning import Tuning

__all__ = ["EntryState", "LoadedModel", "PipelineCache", "load_pipeline", "module_bytes"]

log = logging.getLogger(__name__)

SHAREABLE = ("vae",)
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".ckpt", ".pt", ".pth"}


class EntryState(StrEnum):
    """A cache entry's life: loading, resident (serving), evicted (memory released)."""

    LOADING = "loading"
    RESIDENT = "resident"
    EVICTED = "evicted"


@dataclass
class LoadedModel:
    """A resident pipeline, its adapters and what we know about it."""

    spec: ModelSpec
    pipeline: Any
    adapters: AdapterManager | SlotAdapters
    path: Path
    load_seconds: float
    state: EntryState = EntryState.RESIDENT
    shared: dict[str, str] = field(default_factory=dict)  # component -> fingerprint
    uses: int = 0
    last_used: float = field(default_factory=time.monotonic)
    weights_sha256: str | None = None  # of every file of the model (content, not paths or dates)
    family: Family = Family.SD  # of the loaded pipeline (its class)
    image_seconds: float | None = None  # pipeline seconds per image, a moving average over its calls
    unreported_load: float | None = None  # seconds of a load beside the engine, until a call reports it
    loaded_span: tuple[float, float] | None = None  # wall clock of a load beside the engine (start, end)
    loaded_at: float | None = None  # monotonic end of a load beside the engine
    schedulers: SchedulerSwitch = field(init=False)

    def __post_init__(self) -> None:
        self.schedulers = SchedulerSwitch(getattr(self.pipeline, "scheduler", None))

    def load_waited(self, load: float, enqueued: float) -> float:
        """The part of ``load`` seconds a job that reached the engine at ``enqueued`` (monotonic) waited for: all
        of a load its own call ran; of a load beside the engine, from its arrival to the load's end (a job that
        came late in the load waited only for the rest of it)."""
        if self.loaded_at is None:
            return load
        return min(load, max(0.0, self.loaded_at - enqueued))

    def timed_call(self, seconds: float, images: int) -> None:
        """Fold one pipeline call into :attr:`image_seconds` (reported, so that idle workers can weigh a load)."""
        per_image = seconds / max(1, images)
        previous = self.image_seconds
        self.image_seconds = per_image if previous is None else 0.7 * previous + 0.3 * per_image


def module_bytes(module: Any) -> int:
    """Bytes held by a module's parameters and buffers."""
    tensors = [*getattr(module, "parameters", lambda: [])(), *getattr(module, "buffers", lambda: [])()]
    return sum(t.numel() * t.element_size() for t in tensors)


def load_pipeline(path: Path, device: DeviceInfo, dtype: str, *, allow_pickle: bool = False,
                  components: dict[str, Any] | None = None, scheduler: str | None = None,
                  config: Path | None = None, tuning: Tuning | None = None,
                  ip_adapter: IPAdapterFiles | None = None, family: Family | None = None) -> Any:
    """Load a diffusers folder (or, with ``config``, a single-file checkpoint) as its family's img2img pipeline
    (``family``, else the one its ``model_index.json`` names; SD when neither says) on ``device`` with ``tuning``
    applied, and its IP-Adapter if it has one; local files only."""
    import diffusers
    import torch

    family = family or family_of_folder(config if config is not None else path) or Family.SD
    cls = getattr(diffusers, img2img_class(family))
    if config is not None:
        check_single_file(family, path.name)
        pipe = load_single_file(path, config, getattr(torch, dtype), components, img2img_class(family))
    else:
        with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype; older ones lack dtype
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
            pipe = _from_pretrained(cls, path, getattr(torch, dtype), allow_pickle, components,
                                    sd=family is Family.SD)
    if ip_adapter is not None:  # before tuning: placement and offload then cover the image encoder too
        load_ip_adapter(pipe, ip_adapter, allow_pickle=allow_pickle)
    (tuning or Tuning()).apply(pipe, device)
    pipe.set_progress_bar_config(disable=True)
    if scheduler:
        scheduler_cls = getattr(diffusers, scheduler, None)
        if scheduler_cls is None or not hasattr(scheduler_cls, "from_config"):
            raise JobError(ErrorCode.MODEL_LOAD_FAILED, f"unknown scheduler {scheduler!r} in the model registry")
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    return pipe


def _from_pretrained(cls: Any, path: Path, dtype: Any, allow_pickle: bool, components: dict[str, Any] | None,
                     *, sd: bool = True) -> Any:
    extra = {"safety_checker": None, "requires_safety_checker": False} if sd else {}  # SD 1.x/2.x only
    return cls.from_pretrained(
        str(path),
        torch_dtype=dtype,
        **extra,
        local_files_only=True,
        use_safetensors=None if allow_pickle else True,
        **(components or {}),
    )


class PipelineCache:
    """Resident pipelines by model id, least recently used evicted beyond ``budget_bytes``."""

    def __init__(
        self,
        registry: ModelRegistry,
        device: DeviceInfo,
        files: FileCache,
        *,
        budget_bytes: int,
        max_adapters: int = 8,
        allow_pickle: bool = False,
        tuning: Tuning | None = None,
    ) -> None:
        self.registry = registry
        self.device = device
        self.files = files
        self.budget_bytes = budget_bytes
        self.max_adapters = max_adapters
        self.allow_pickle = allow_pickle
        self.tuning = tuning or Tuning()
        self._check_sources()
        self._resident: OrderedDict[str, LoadedModel] = OrderedDict()
        self._shared: dict[str, weakref.ref[Any]] = {}  # fingerprint -> module
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._families: dict[str, Family | None] = {}  # model id -> family known before loading
        self.hits = self.misses = self.evictions = 0
        # wraps each model load (the worker's queue subscriptions pause while the engine is loading)
        self.on_load: Callable[[str], AbstractContextManager[Any]] | None = None
        # wraps a load beside the engine (the subscriptions keep the resident models' hot queues)
        self.on_load_beside: Callable[[str], AbstractContextManager[Any]] | None = None
        # the loader thread and the engine thread both change the resident set: every change, and every
        # claim of a model by the engine's call, holds this lock; a load waiting for a victim's call waits on it
        self._lock = threading.Condition(threading.RLock())
        self._in_use: dict[str, int] = {}  # model -> calls running with it now (claimed by the engine)
        self._leaving: set[str] = set()  # resident models a load beside the engine evicts once their call ends

    # -- queries ---------------------------------------------------------------
    def family_of(self, model_id: str) -> Family | None:
        """The model's family: its loaded pipeline's, else what its registry entry or folder says (None:
        not known until it loads, e.g. a model on s3://)."""
        entry = self._resident.get(model_id)
        if entry is not None:
            return entry.family
        try:
            return self._families.setdefault(model_id, family_of_spec(self.registry.get(model_id)))
        except JobError:
            return None

    def is_resident(self, model_id: str) -> bool:
        """Whether the model is resident and may be claimed for a call (not leaving for a load beside)."""
        with self._lock:
            return model_id in self._resident and model_id not in self._leaving

    @property
    def resident(self) -> list[str]:
        with self._lock:
            return list(self._resident)

    def get_entry(self, model_id: str) -> LoadedModel:
        """A resident entry without counting a use (for reporting)."""
        return self._resident[model_id]

    def entries(self) -> dict[str, LoadedModel]:
        """The resident entries, least recently used first, without counting a use (for reporting, any thread)."""
        with self._lock:
            return dict(self._resident)

    def resident_bytes(self) -> int:
        """Bytes of all resident weights, each shared module counted once."""
        seen: dict[int, int] = {}
        for entry in self.entries().values():
            if entry.pipeline is None:
                continue
            for module in entry.pipeline.components.values():
                if hasattr(module, "parameters") and id(module) not in seen:
                    seen[id(module)] = module_bytes(module)
        return sum(seen.values())

    def dtype_of(self, spec: ModelSpec) -> str:
        """The dtype a model loads in: its registry dtype, else the worker's (one rule: :func:`resolve_dtype`)."""
        return resolve_dtype(spec.dtype, self.device.device.partition(":")[0]) if spec.dtype else self.device.dtype

    def _check_sources(self) -> None:
        """At start-up: every model's dtype suits the device, and pickle checkpoints are allowed if named."""
        for spec in self.registry:
            try:
                self.dtype_of(spec)
            except ConfigurationError as exc:
                raise ConfigurationError(f"model {spec.id!r}: {exc}") from None
            suffix = Path(spec.source).suffix.lower()
            if spec.is_single_file and suffix in PICKLE_SUFFIXES and not self.allow_pickle:
                raise ConfigurationError(
                    f"model {spec.id!r}: {spec.source} is a pickle checkpoint ({suffix}), which can run code when "
                    "loaded; convert it to .safetensors, or set DARKROOM_ALLOW_PICKLE_WEIGHTS=true if you trust it"
                )
            ip_weights = spec.ip_adapter.weights if spec.ip_adapter is not None else ""
            if Path(ip_weights).suffix.lower() in PICKLE_SUFFIXES and not self.allow_pickle:
                raise ConfigurationError(
                    f"model {spec.id!r}: IP-Adapter weights {ip_weights} are a pickle, which can run code when "
                    "loaded; convert them to .safetensors, or set DARKROOM_ALLOW_PICKLE_WEIGHTS=true if you trust them"
                )

    # -- use -------------------------------------------------------------------
    def get(self, model_id: str) -> LoadedModel:
        """The resident model, loading it (and evicting least recently used ones) if needed."""
        return self.use(model_id)[0]

    def use(self, model_id: str) -> tuple[LoadedModel, float, bool]:
        """The resident model for a call, loading it here if needed, with the load's seconds and whether this
        call pays for a load (its own, or the load beside the engine that made the model resident for it)."""
        spec = self.registry.get(model_id)
        with self._lock:
            entry = self._resident.get(model_id)
        if entry is None:
            started = time.perf_counter()
            with self._lock:
                self.misses += 1
            with self.on_load(model_id) if self.on_load is not None else nullcontext():
                entry = self._load(spec)
            with self._lock:
                self._resident[model_id] = entry
                self._evict_until_within_budget(keep=model_id)
            load, loaded = time.perf_counter() - started, True
        elif entry.unreported_load is not None:  # loaded beside the engine for this call: already a miss
            load, loaded, entry.unreported_load = entry.unreported_load, True, None
        else:
            load, loaded = 0.0, False
            self.hits += 1
        with self._lock:
            if model_id in self._resident:
                self._resident.move_to_end(model_id)
        entry.uses += 1
        entry.last_used = time.monotonic()
        return entry, load, loaded

    # -- loads beside the engine ------------------------------------------------
    def claim(self, model_id: str) -> bool:
        """Mark a resident model as used by the call about to run (False: not resident, or leaving)."""
        with self._lock:
            if model_id not in self._resident or model_id in self._leaving:
                return False
            self._in_use[model_id] = self._in_use.get(model_id, 0) + 1
            return True

    def release(self, model_id: str) -> None:
        """The call that claimed ``model_id`` has ended (a load waiting to evict it may go on)."""
        with self._lock:
            left = self._in_use.get(model_id, 0) - 1
            if left > 0:
                self._in_use[model_id] = left
            else:
                self._in_use.pop(model_id, None)
            self._lock.notify_all()

    def load_beside(self, model_id: str) -> LoadedModel:
        """Load ``model_id`` on this (non-engine) thread while the engine calls resident models; the first call
        that uses it reports the load (:meth:`use`). Room is made as for any load, least recently used first,
        except that a model in a call is evicted once the call ends (it is never claimed again meanwhile)."""
        spec = self.registry.get(model_id)
        with self._lock:
            entry = self._resident.get(model_id)
            if entry is not None:
                return entry
            self.misses += 1
        started = time.perf_counter()
        since = time.time()
        with self.on_load_beside(model_id) if self.on_load_beside is not None else nullcontext():
            entry = self._load(spec)
        entry.unreported_load = time.perf_counter() - started
        entry.loaded_span = (since, time.time())
        entry.loaded_at = time.monotonic()
        with self._lock:
            self._resident[model_id] = entry
            self._evict_until_within_budget(keep=model_id)
        return entry

    def evict(self, model_id: str) -> None:
        with self._lock:
            entry = self._resident.pop(model_id, None)
            self._leaving.discard(model_id)
        if entry is None:
            return
        entry.state = EntryState.EVICTED
        entry.pipeline = None
        entry.adapters.pipeline = None
        del entry
        gc.collect()
        if self.device.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
        self.evictions += 1
        log.info("evicted model %s", model_id)

    # -- internals -----------------------------------------------------------
    def _load(self, spec: ModelSpec) -> LoadedModel:
        started = time.perf_counter()
        path = self._local_path(spec)
        config = self._config_path(spec) if spec.is_single_file else None
        dtype = self.dtype_of(spec)
        share = self.tuning.shares_components and config is None
        fingerprints = {c: self._fingerprint(path / c, dtype) for c in SHAREABLE if share and (path / c).is_dir()}
        reuse = {c: m for c, fp in fingerprints.items() if (m := self._live_shared(fp)) is not None}
        estimate = self._estimate_bytes(path, dtype) - sum(module_bytes(m) for m in reuse.values())
        if estimate > self.budget_bytes:
            raise JobError(ErrorCode.MODEL_TOO_LARGE,
                           f"model {spec.id!r} needs about {estimate} bytes; the budget is {self.budget_bytes}")
        self._make_room(estimate)
        ip_adapter = self._ip_adapter_files(spec)
        identity = self._identity_beside(path)  # hashing every file runs while the pipeline loads
        try:
            pipeline = load_pipeline(path, self.device, dtype, allow_pickle=self.allow_pickle, components=reuse,
                                     scheduler=spec.scheduler, config=config, tuning=self.tuning,
                                     ip_adapter=ip_adapter, family=spec.family)
        except (OSError, ValueError) as exc:
            raise JobError(ErrorCode.MODEL_LOAD_FAILED, f"model {spec.id!r} from {spec.source}: {exc}") from exc
        for component, fp in fingerprints.items():
            self._shared[fp] = weakref.ref(getattr(pipeline, component))
        seconds = time.perf_counter() - started
        log.info("loaded model %s from %s in %.2f s (%d MB, sharing %s)", spec.id, spec.source, seconds,
                 module_bytes_all(pipeline) // 2**20, ", ".join(reuse) or "nothing")
        adapters = self._adapters(pipeline, spec)
        self.tuning.warm_up(pipeline)  # with compile: the declared shapes now, not in the first jobs
        seconds = time.perf_counter() - started
        return LoadedModel(spec, pipeline, adapters, path, seconds,
                           shared=fingerprints, weights_sha256=identity(),
                           family=family_of_class(type(pipeline).__name__) or Family.SD)

    def _adapters(self, pipeline: Any, spec: ModelSpec) -> AdapterManager | SlotAdapters:
        """The pipeline's adapter slots: peft's layers, or fixed slot buffers (compiled workers, see :mod:`.slotted`).

        Slots wrap the usual LoRA targets now, before any compile, when the model takes adapters at all.
        """
        if not self.tuning.adapter_slots:
            return AdapterManager(pipeline, max_slots=self.max_adapters)
        slots = SlotAdapters(pipeline, max_slots=self.max_adapters, rank=self.tuning.lora_max_rank)
        if spec.allowed_adapters is None or spec.allowed_adapters:
            slots.bank.prewrap()
        return slots

    def _local_path(self, spec: ModelSpec) -> Path:
        if not spec.is_s3:
            return Path(spec.source)
        if spec.is_single_file:
            return self._fetch(spec, lambda: self.files.fetch_file(S3Uri.parse(spec.source)))
        path = self._fetch(spec, lambda: self.files.fetch_tree(S3Uri.parse(spec.source.rstrip("/"),
                                                                           allow_empty_key=True)))
        if not (path / "model_index.json").is_file():
            raise JobError(ErrorCode.MODEL_NOT_FOUND, f"model {spec.id!r}: {spec.source} holds no model_index.json")
        return path

    def _config_path(self, spec: ModelSpec) -> Path:
        config = spec.config or ""
        if not config.startswith("s3://"):
            return Path(config)
        path = self._fetch(spec, lambda: self.files.fetch_tree(S3Uri.parse(config.rstrip("/"), allow_empty_key=True)))
        if not (path / "model_index.json").is_file():
            raise JobError(ErrorCode.MODEL_NOT_FOUND, f"model {spec.id!r}: config {config} holds no model_index.json")
        return path

    def _ip_adapter_files(self, spec: ModelSpec) -> IPAdapterFiles | None:
        """The model's IP-Adapter on local disk (``s3://`` files fetched once into the host's cache)."""
        ip = spec.ip_adapter
        if ip is None:
            return None
        weights = (self._fetch(spec, lambda: self.files.fetch_file(S3Uri.parse(ip.weights)))
                   if ip.weights.startswith("s3://") else Path(ip.weights))
        encoder = Path(ip.image_encoder)
        if ip.image_encoder.startswith("s3://"):
            encoder = self._fetch(spec, lambda: self.files.fetch_tree(S3Uri.parse(ip.image_encoder.rstrip("/"),
                                                                                  allow_empty_key=True)))
            if not (encoder / "config.json").is_file():
                raise JobError(ErrorCode.MODEL_NOT_FOUND, f"model {spec.id!r}: IP-Adapter image_encoder "
                                                          f"{ip.image_encoder} holds no config.json")
        return IPAdapterFiles(weights, encoder)

    @staticmethod
    def _fetch(spec: ModelSpec, fetch: Callable[[], Path]) -> Path:
        try:
            path: Path = fetch()
        except ObjectNotFoundError as exc:
            raise JobError(ErrorCode.MODEL_NOT_FOUND, f"model {spec.id!r}: {exc}") from exc
        except StorageError as exc:
            raise JobError(ErrorCode.MODEL_LOAD_FAILED, f"model {spec.id!r}: {exc}") from exc
        return path

    def _live_shared(self, fingerprint: str) -> Any | None:
        ref = self._shared.get(fingerprint)
        module = ref() if ref is not None else None
        if module is None:
            self._shared.pop(fingerprint, None)
        return module

    def _fingerprint(self, folder: Path, dtype: str) -> str:
        digest = hashlib.sha256(f"{dtype}|{self.device.device}".encode())
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(file.relative_to(folder).as_posix().encode())
            digest.update(self._file_hash(file).encode())
        return digest.hexdigest()

    def _identity(self, path: Path) -> str:
        """What result.json names the model by: a sha256 over its files' relative paths and sha256s
        (cached per file by size and mtime, so a model is hashed once per process)."""
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        digest = hashlib.sha256()
        for file in files:
            digest.update((file.name if file == path else file.relative_to(path).as_posix()).encode())
            digest.update(self._file_hash(file).encode())
        return digest.hexdigest()

    def _identity_beside(self, path: Path) -> Callable[[], str]:
        """Start :meth:`_identity` on its own thread and return the call that waits for it. sha256 releases the
        GIL while it hashes, so a large model's files are hashed on another core while this one imports and
        loads the pipeline (and the hashing reads the files into the page cache the load reads them from)."""
        future: Future[str] = Future()

        def run() -> None:
            try:
                future.set_result(self._identity(path))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting load, which raises it
                future.set_exception(exc)

        threading.Thread(target=run, name="darkroom-model-hash", daemon=True).start()
        return future.result

    def _file_hash(self, file: Path) -> str:
        stat = file.stat()
        key = (str(file), stat.st_size, stat.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = sha256_file(file)
        return self._hashes[key]

    def _estimate_bytes(self, path: Path, dtype: str) -> int:
        """Weight bytes once loaded at ``dtype``: each file's tensors by their stored type (read from the
        safetensors header: 32-bit ones halve when loaded as 16-bit); other files by their size."""
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.suffix in _WEIGHT_SUFFIXES and p.is_file()]
        return sum(_loaded_bytes(p, dtype) for p in files)

    def _make_room(self, incoming: int) -> None:
        """Evict least recently used models until ``incoming`` bytes fit. A model in a call (only while loading
        beside the engine) is marked leaving first, so no new call claims it, and evicted when its call ends."""
        with self._lock:
            while self._resident and self.resident_bytes() + incoming > self.budget_bytes:
                free = next((m for m in self._resident if m not in self._in_use), None)
                if free is not None:
                    self.evict(free)
                    continue
                victim = next(iter(self._resident))
                self._leaving.add(victim)
                while victim in self._in_use:
                    self._lock.wait()
                self.evict(victim)

    def _evict_until_within_budget(self, keep: str) -> None:
        with self._lock:
            while self.resident_bytes() > self.budget_bytes:
                victim = next((m for m in self._resident if m != keep and m not in self._in_use), None)
                if victim is None:
                    break
                self.evict(victim)


def module_bytes_all(pipeline: Any) -> int:
    return sum(module_bytes(m) for m in pipeline.components.values() if hasattr(m, "parameters"))


def _loaded_bytes(file: Path, dtype: str) -> int:
    """Bytes of ``file``'s tensors once loaded at ``dtype``: from a safetensors header, 32-bit floats halve
    at 16-bit; anything unreadable counts its file size (a pickle file is not opened)."""
    size = file.stat().st_size
    if file.suffix != ".safetensors" or dtype not in {"float16", "bfloat16"}:
        return size
    try:
        with file.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length)) if 0 < length < 100_000_000 else {}
    except (OSError, ValueError):
        return size
    total = 0
    for name, info in header.items():
        if name == "__metadata__" or not isinstance(info, dict):
            continue
        start, stop = info.get("data_offsets", (0, 0))
        total += (stop - start) // 2 if info.get("dtype") == "F32" else stop - start
    return total or size
