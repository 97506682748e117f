"""GPU suite: everything a short GPU lease should measure, as one command and one JSON report.

    python bench/gpu_suite.py                      # on a CUDA machine: SD 1.5 shapes, random weights, 512x512 fp16
    python bench/gpu_suite.py --dry-run            # here: the tiny model on the CPU, same code path, small counts
    python bench/gpu_suite.py --sections bare_eager,darkroom_eager --budget-s 200
    bash bench/gpu_suite.sh                        # on a fresh GPU machine (installs carried wheels first)

Sections, in order (``--list`` prints them with their estimated GPU seconds):

- ``environment``: versions, the device and the dtype Darkroom picks for it (``select_device("auto")``: fp16 on
  CUDA), the SDPA kernels torch has enabled, whether xFormers is installed;
- ``build``: the SD 1.5 architecture with random weights (UNet, 4-level VAE, 12-layer CLIP text encoder and an
  offline byte-level tokenizer, no hub access) saved once, plus ``--loras`` random LoRAs for it;
- ``bare_eager`` / ``bare_compiled``: a bare diffusers img2img pipeline, in-memory inputs, batch 1 and batch
  ``--batch``: it/s (UNet steps of one call per second), images/s, the first call (compile) time;
- ``darkroom_eager`` / ``darkroom_compiled``: the worker's own code in this process (the model registry,
  ``PipelineCache`` with the worker's ``Tuning``, the batching ``Engine`` and ``BatchExecutor``, the latent
  cache): (c) batching off and (d) batching on, each ÷ bare at the same batch size. No queue, storage or
  encoding: ``bench/throughput.py`` measures those through a real worker. ``darkroom_compiled`` holds the
  adapters in slots (as a compiled worker does), compiles at model load for the suite's size at batch 1 to ``--batch``,
  adds mixed-adapter batches of the ``--loras`` LoRAs inside the compiled graph (÷ its own (d)), and reports
  the recompiles after that warm-up (target 0);
- ``mixed_lora``: ``--loras`` resident LoRAs (every third also on the text encoder), one per job at random,
  mixed-adapter batches through the engine: images/s, ÷ darkroom_eager (d), how calls were routed;
- ``lora_switch``: ``AdapterManager.activate``: first load of each LoRA, then switches between resident ones;
- ``attention``: batch-1 it/s with each attention kernel Darkroom offers (sdpa, slicing, xformers if installed);
- ``offload``: ``DARKROOM_CPU_OFFLOAD=model`` (and one ``sequential`` call): it/s and peak GPU memory;
- ``memory_budget``: ``PipelineCache`` under a ``DARKROOM_MODEL_MEMORY_BUDGET_BYTES`` that holds one model: load,
  load a second (the first is evicted), GPU memory before and after, reload, and a model larger than the budget
  refused with ``model_too_large``;
- ``load_beside``: the worker's engine with loads beside it (``ModelLoads``): a job for a second model, then
  ``--batch`` x calls jobs for a resident one; the resident model's calls run while the second loads on the loader
  thread. Wall time against the calls and the load each alone (``overlap``: their sum ÷ the wall time, 1.0 when
  nothing overlapped), peak GPU memory, and each job's reported load.

Every section is timed and guarded: a failure is recorded (error and traceback) and the suite goes on. The
report is rewritten after every section, so a run stopped half-way still leaves one. ``--budget-s`` (default
450) skips the sections that no longer fit, each with its reason. ``--dry-run`` runs every section on the tiny
model on the CPU with small counts; CUDA-only options are applied there through the same calls (offload on the
CPU device, compile with the ``eager`` backend instead of inductor, which takes minutes on a CPU), and the
report says so.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import _common  # quiets libraries before they load; shared helpers
from _common import table

SUITE_VERSION = 1


@dataclass(frozen=True)
class Section:
    name: str
    estimate_s: float  # on an H100, to decide what still fits in the budget
    run: Callable[[Suite], dict[str, Any]]
    needs: tuple[str, ...] = ("build",)


@dataclass
class Config:
    dry_run: bool
    device: str
    dtype: str
    size: int
    steps: int
    strength: float
    guidance: float
    batch: int
    calls: int  # timed calls per measurement
    loras: int
    lora_rank: int
    compile_backend: str
    budget_s: float
    workdir: Path
    inject_failure: tuple[str, ...] = ()  # tests: sections that raise at once


@dataclass
class Suite:
    config: Config
    out: Path
    report: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    model: Path | None = None
    loras: list[Path] = field(default_factory=list)
    inputs: list[Any] = field(default_factory=list)

    # -- running -------------------------------------------------------------------------------------
    def run(self, sections: list[Section]) -> None:
        self.report = {"suite": "darkroom-gpu-suite", "version": SUITE_VERSION,
                       "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
                       "dry_run": self.config.dry_run, "config": _jsonable(vars(self.config)), "sections": {},
                       "finished": False}
        self.write()
        for section in sections:
            record = self.report["sections"][section.name] = {"status": "running"}
            elapsed = time.monotonic() - self.started
            left = self.config.budget_s - elapsed
            missing = [n for n in section.needs if self.report["sections"].get(n, {}).get("status") != "ok"]
            if missing:
                record.update(status="skipped", reason=f"needs section(s) {', '.join(missing)}, which did not succeed")
            elif not self.config.dry_run and left < section.estimate_s:
                record.update(status="skipped", reason=f"time budget: {left:.0f} s of --budget-s "
                                                       f"{self.config.budget_s:.0f} left, this section needs about "
                                                       f"{section.estimate_s:.0f} s")
            elif left <= 0:
                record.update(status="skipped", reason=f"time budget of {self.config.budget_s:.0f} s spent")
            else:
                print(f"[{elapsed:6.1f} s] {section.name} ...", file=sys.stderr, flush=True)
                record.update(self.guarded(section))
            self.write()
        self.report["finished"] = True
        self.report["elapsed_s"] = round(time.monotonic() - self.started, 2)
        self.report["table"] = rows(self.report)
        self.write()

    def guarded(self, section: Section) -> dict[str, Any]:
        _reset_peak(self.config.device)
        began = time.perf_counter()
        try:
            if section.name in self.config.inject_failure:
                raise RuntimeError(f"failure injected into {section.name} (--inject-failure)")
            results = section.run(self)
            status: dict[str, Any] = {"status": "ok", "results": _jsonable(results)}
        except Exception as exc:  # noqa: BLE001 - one section's failure must never lose the report
            status = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000],
                      "traceback": traceback.format_exc()[-6000:]}
            print(f"  {section.name} failed: {status['error']}", file=sys.stderr, flush=True)
        status["seconds"] = round(time.perf_counter() - began, 3)
        status["peak_memory_bytes"] = _peak_memory(self.config.device)
        _free(self.config.device)
        return status

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.report, indent=2, default=str))
        tmp.replace(self.out)

    def result(self, section: str) -> dict[str, Any]:
        record = self.report["sections"].get(section, {})
        return record.get("results", {}) if record.get("status") == "ok" else {}

    # -- shared helpers ------------------------------------------------------------------------------
    @property
    def model_path(self) -> Path:
        if self.model is None:
            raise RuntimeError("no model: the build section did not run")
        return self.model

    @property
    def steps_run(self) -> int:
        return int(self.config.steps * self.config.strength)

    def device_info(self) -> Any:
        from darkroom.worker.device import DeviceInfo, select_device

        info = select_device(self.config.device, "auto")
        return DeviceInfo(info.device, self.config.dtype, info.name, info.total_memory)

    def registry(self, models: dict[str, Path], *, adapters: bool = True) -> Any:
        from darkroom.worker.registry import AdapterSpec, ModelRegistry, ModelSpec

        registry = ModelRegistry()
        for model_id, path in models.items():
            registry.add(ModelSpec(model_id, str(path), allowed_adapters=None if adapters else ()))
        if adapters:
            for index, lora in enumerate(self.loras):
                registry.add_adapter(AdapterSpec(f"lora{index}", str(lora)))
        return registry

    def pipeline_cache(self, registry: Any, *, tuning: Any = None, budget: int | None = None) -> Any:
        from darkroom.worker.pipelines import PipelineCache

        device = self.device_info()
        return PipelineCache(registry, device, cast(Any, None), budget_bytes=budget or device.default_budget(),
                             max_adapters=max(1, len(self.loras)), tuning=tuning)


# -- sections ------------------------------------------------------------------------------------------
def section_environment(suite: Suite) -> dict[str, Any]:
    import torch

    from darkroom.common.errors import ConfigurationError
    from darkroom.worker.device import resolve_dtype, select_device

    versions = {}
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "xformers", "triton"):
        with contextlib.suppress(Exception):
            versions[name] = __import__(name).__version__
    auto = select_device(suite.config.device, "auto")
    out: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "versions": versions,
        "cuda_available": torch.cuda.is_available(), "device": auto.device, "device_name": auto.name,
        "total_memory_bytes": auto.total_memory, "auto_dtype": auto.dtype, "suite_dtype": suite.config.dtype,
        "xformers_installed": importlib.util.find_spec("xformers") is not None,
        "cpu_count": os.cpu_count(),
    }
    try:
        resolve_dtype("float16", "cpu")
        out["fp16_on_cpu"] = "accepted"
    except ConfigurationError as exc:
        out["fp16_on_cpu"] = f"refused: {exc}"
    if torch.cuda.is_available():
        out["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        backends: Any = torch.backends.cuda
        out["sdpa"] = {"flash": backends.flash_sdp_enabled(), "mem_efficient": backends.mem_efficient_sdp_enabled(),
                       "math": backends.math_sdp_enabled(),
                       "cudnn": getattr(backends, "cudnn_sdp_enabled", lambda: None)()}
        out["torch_cuda"] = torch.version.cuda
    expected = "float16" if auto.device.startswith("cuda") else "float32"
    if auto.dtype != expected:
        raise RuntimeError(f"select_device('auto') chose {auto.dtype} on {auto.device}; expected {expected}")
    return out


def section_build(suite: Suite) -> dict[str, Any]:
    import numpy as np
    from _models import make_full_size_model, make_random_loras
    from PIL import Image

    from darkroom.dev.tiny import make_tiny_model

    c = suite.config
    t0 = time.perf_counter()
    if c.dry_run:
        suite.model = make_tiny_model(c.workdir / "model")
    else:
        suite.model = make_full_size_model(c.workdir / "model", dtype=c.dtype, device=c.device)
    model_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    suite.loras = make_random_loras(suite.model, c.workdir / "loras", c.loras, rank=c.lora_rank) if c.loras else []
    loras_s = time.perf_counter() - t1
    rng = np.random.default_rng(0)
    suite.inputs = [Image.fromarray(rng.integers(0, 256, (c.size, c.size, 3), dtype=np.uint8))
                    for _ in range(max(16, 2 * c.batch))]
    size = sum(p.stat().st_size for p in suite.model.rglob("*") if p.is_file())
    return {"model_seconds": model_s, "model_bytes_on_disk": size, "loras": len(suite.loras),
            "lora_rank": c.lora_rank, "loras_seconds": loras_s,
            "lora_bytes_each": suite.loras[0].stat().st_size if suite.loras else 0}


def _bare_pipeline(suite: Suite, *, compile_unet: bool = False) -> Any:
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline

    from darkroom.worker.inference.call import clip_skip_compat

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(str(suite.model_path), torch_dtype=getattr(torch, suite.config.dtype),
                                                          safety_checker=None, requires_safety_checker=False)
    pipe = pipe.to(suite.config.device)
    pipe.set_progress_bar_config(disable=True)
    clip_skip_compat(pipe.text_encoder)
    if compile_unet:
        with compile_backend(suite.config):
            pipe.unet.compile()  # what Darkroom's Tuning does
    return pipe


def _bare_call(suite: Suite, pipe: Any, batch: int, offset: int = 0, steps: int | None = None,
               strength: float | None = None) -> Any:
    import torch

    c = suite.config
    images = [suite.inputs[(offset + i) % len(suite.inputs)] for i in range(batch)]
    return pipe(prompt=[f"a lighthouse at dusk, variant {offset + i}" for i in range(batch)], image=images,
                strength=strength or c.strength, num_inference_steps=steps or c.steps, guidance_scale=c.guidance,
                generator=[torch.Generator("cpu").manual_seed(1000 + offset + i) for i in range(batch)],
                num_images_per_prompt=1).images


def _measure_bare(suite: Suite, pipe: Any, batch: int) -> dict[str, Any]:
    c = suite.config
    t0 = time.perf_counter()
    _bare_call(suite, pipe, batch)  # warm-up (and compilation for this shape)
    _sync(c.device)
    first = time.perf_counter() - t0
    samples = []
    for call in range(c.calls):
        t = time.perf_counter()
        _bare_call(suite, pipe, batch, offset=call * batch)
        _sync(c.device)
        samples.append(time.perf_counter() - t)
    median = sorted(samples)[len(samples) // 2]
    return {"batch": batch, "first_call_s": first, "call_s_median": median, "call_s": samples,
            "it_per_s": suite.steps_run / median, "images_per_s": batch / median}


def section_bare_eager(suite: Suite) -> dict[str, Any]:
    pipe = _bare_pipeline(suite)
    return {"b1": _measure_bare(suite, pipe, 1), f"b{suite.config.batch}": _measure_bare(suite, pipe, suite.config.batch)}


def section_bare_compiled(suite: Suite) -> dict[str, Any]:
    pipe = _bare_pipeline(suite, compile_unet=True)
    out: dict[str, Any] = {"b1": _measure_bare(suite, pipe, 1),
                           f"b{suite.config.batch}": _measure_bare(suite, pipe, suite.config.batch)}
    out["backend"] = suite.config.compile_backend
    return out


@contextlib.contextmanager
def compile_backend(config: Config) -> Iterator[None]:
    """Make ``torch.compile`` calls without a backend (``Module.compile()``, as Darkroom's Tuning makes) use
    ``config.compile_backend``; nothing changes for inductor, the default."""
    import torch

    if config.compile_backend == "inductor":
        yield
        return
    original = torch.compile

    def patched(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("backend", config.compile_backend)
        return original(*args, **kwargs)

    torch.compile = patched
    try:
        yield
    finally:
        torch.compile = original


class InProcessDarkroom:
    """The worker's engine and executor over a ``PipelineCache``, fed by threads like a worker's task slots."""

    def __init__(self, suite: Suite, models: Any, *, batch: int, mixed: bool = True, loads: Any = None) -> None:
        from darkroom.worker.inference.batching import BatchPolicy
        from darkroom.worker.inference.engine import Engine
        from darkroom.worker.inference.executor import BatchExecutor
        from darkroom.worker.latents import LatentCache
        from darkroom.worker.settings import WorkerSettings

        self.suite = suite
        settings = cast(Any, WorkerSettings)(batch_max_images=batch, mixed_adapters=mixed, max_adapters=models.max_adapters,
                                  device=suite.config.device, safety_checker="none")
        ctx = SimpleNamespace(settings=settings, models=models, files=None)  # what BatchExecutor reads
        self.executor = BatchExecutor(cast(Any, ctx), LatentCache(settings.latent_cache_bytes))
        self.engine = Engine(BatchPolicy(max_images=batch, max_wait=settings.batch_max_wait_ms / 1000),
                             self.executor, slots=settings.slots, loads=loads)
        self.slots = settings.slots

    def jobs(self, count: int, offset: int = 0, adapters: list[str] | None = None, model: str = "bench") -> list[Any]:
        from darkroom.common.jobs import Img2ImgJob

        c = self.suite.config
        return [cast(Any, Img2ImgJob)(model=model, image=f"s3://darkroom/bench/{offset + i:05d}.png",
                           prompt=f"a lighthouse at dusk, variant {offset + i}", seed=1000 + offset + i,
                           strength=c.strength, num_inference_steps=c.steps, guidance_scale=c.guidance,
                           adapters=[] if adapters is None else [{"uri": adapters[i % len(adapters)], "weight": 1.0}],
                           output_prefix="s3://darkroom/bench-out")
                for i in range(count)]

    def run(self, jobs: list[Any]) -> tuple[float, list[Any]]:
        """Submit every job from its own slot thread at once; the seconds until the last result, and results."""
        from darkroom.worker.inference.call import WorkItem, batch_key
        from darkroom.worker.inference.engine import Request
        from darkroom.worker.latents import pixel_digest

        def one(index_job: tuple[int, Any]) -> Any:
            index, job = index_job
            with self.engine.occupied(), self.engine.preparing() as slot:
                image = self.suite.inputs[index % len(self.suite.inputs)]
                item = WorkItem(job, image, job.seeds(), digest=pixel_digest(image),
                                adapters=self.executor.resolve_adapters(job))
                key = batch_key(item, mixed_adapters=self.executor.mixing.allows(job.model))
                return slot.infer(Request(item, key))

        with ThreadPoolExecutor(max_workers=min(len(jobs), self.slots)) as pool:
            started = time.perf_counter()
            results = list(pool.map(one, enumerate(jobs)))
            _sync(self.suite.config.device)
            return time.perf_counter() - started, results


def _release(models: Any) -> None:
    """Evict every model of a ``PipelineCache`` (an engine thread, idle for good, still holds the cache)."""
    for model_id in list(models.resident):
        models.evict(model_id)


def _measure_darkroom(suite: Suite, models: Any, batch: int, jobs: int, *, adapters: list[str] | None = None,
                      mixed: bool = True) -> dict[str, Any]:
    darkroom = InProcessDarkroom(suite, models, batch=batch, mixed=mixed)
    t0 = time.perf_counter()  # warm-up: every adapter loaded, this batch size called
    darkroom.run(darkroom.jobs(max(batch, len(adapters or [])), offset=900, adapters=adapters))
    first = time.perf_counter() - t0
    seconds, results = darkroom.run(darkroom.jobs(jobs, adapters=adapters))
    calls = [r.details["batch"]["jobs"] for r in results]
    routing: dict[str, int] = {}
    for r in results:
        routing[r.details["adapter_routing"]] = routing.get(r.details["adapter_routing"], 0) + 1
    mean_call = sum(calls) / len(calls)
    return {"batch_max_images": batch, "jobs": jobs, "seconds": seconds, "images_per_s": jobs / seconds,
            "it_per_s": suite.steps_run * jobs / mean_call / seconds, "mean_call_jobs": mean_call,
            "warmup_s": first, "routing": routing,
            "mean_inference_s": sum(r.inference for r in results) / len(results),
            "mean_batch_wait_s": sum(r.batch_wait for r in results) / len(results)}


def _darkroom_section(suite: Suite, *, compiled: bool) -> dict[str, Any]:
    from darkroom.worker import recompiles
    from darkroom.worker.tuning import Tuning

    c = suite.config
    # compiled: adapters held in slots (the worker's choice with DARKROOM_COMPILE), compiled for the suite's size
    tuning = Tuning(compile=compiled, adapter_slots=compiled, lora_max_rank=c.lora_rank,
                    warmup_sizes=((c.size, c.size),), warmup_batch=c.batch)
    registry = suite.registry({"bench": suite.model_path})
    with compile_backend(c):
        if compiled and not c.dry_run:
            tuning.check(suite.device_info(), registry)  # the worker's start-up check (probes inductor)
        models = suite.pipeline_cache(registry, tuning=tuning)
        t0 = time.perf_counter()
        models.get("bench")
        load = time.perf_counter() - t0
        jobs = max(c.calls * c.batch, 2 * c.batch)
        out: dict[str, Any] = {"model_load_s": load, "tuning": tuning.describe(),
               "c": _measure_darkroom(suite, models, 1, max(c.calls, 4)),
               "d": _measure_darkroom(suite, models, c.batch, jobs)}
        if compiled and suite.loras:  # resident LoRAs in slots, mixed batches, inside the compiled graph
            names = [f"lora{i}" for i in range(len(suite.loras))]
            out["mixed"] = _measure_darkroom(suite, models, c.batch, jobs, adapters=names)
            out["mixed/d"] = out["mixed"]["images_per_s"] / out["d"]["images_per_s"]
        out["recompiles_after_warmup"] = recompiles.check("gpu suite")
        _release(models)
    bare = suite.result("bare_compiled" if compiled else "bare_eager")
    if bare:
        out["c/bare_b1"] = out["c"]["images_per_s"] / bare["b1"]["images_per_s"]
        out[f"d/bare_b{c.batch}"] = out["d"]["images_per_s"] / bare[f"b{c.batch}"]["images_per_s"]
    return out


def section_darkroom_eager(suite: Suite) -> dict[str, Any]:
    return _darkroom_section(suite, compiled=False)


def section_darkroom_compiled(suite: Suite) -> dict[str, Any]:
    return _darkroom_section(suite, compiled=True)


def section_mixed_lora(suite: Suite) -> dict[str, Any]:
    c = suite.config
    models = suite.pipeline_cache(suite.registry({"bench": suite.model_path}))
    names = [f"lora{i}" for i in range(len(suite.loras))]
    jobs = max(c.calls * c.batch, 2 * c.batch)
    out: dict[str, Any] = {"loras": len(names), "mixed": _measure_darkroom(suite, models, c.batch, jobs, adapters=names)}
    out["resident_adapters"] = len(models.get_entry("bench").adapters.resident)
    _release(models)
    d = suite.result("darkroom_eager").get("d")
    if d:
        out["mixed/darkroom_d"] = out["mixed"]["images_per_s"] / d["images_per_s"]
    return out


def section_lora_switch(suite: Suite) -> dict[str, Any]:
    from darkroom.worker.adapters import AdapterFile

    models = suite.pipeline_cache(suite.registry({"bench": suite.model_path}))
    manager = models.get("bench").adapters
    files = [AdapterFile.inspect(path) for path in suite.loras]
    loads = [manager.activate([(f, 1.0)]).seconds for f in files]
    _sync(suite.config.device)
    switches = []
    for round_ in range(3):
        for index, f in enumerate(files):
            weight = 1.0 if round_ == 0 else 0.5 + 0.1 * index  # a new scale is a switch too
            switches.append(manager.activate([(f, weight)]).seconds)
    blend = manager.activate([(files[0], 0.6), (files[1], -0.4)]).seconds
    base = manager.activate([]).seconds
    _release(models)
    ordered = sorted(switches)
    return {"adapters": len(files), "first_load_ms_median": 1000 * sorted(loads)[len(loads) // 2],
            "first_load_ms": [1000 * s for s in loads], "switch_ms_median": 1000 * ordered[len(ordered) // 2],
            "switch_ms_max": 1000 * ordered[-1], "blend_ms": 1000 * blend, "to_base_ms": 1000 * base,
            "loads": manager.loads, "hotswaps": manager.hotswaps, "resident": len(manager.resident)}


def section_attention(suite: Suite) -> dict[str, Any]:
    from darkroom.worker.pipelines import load_pipeline
    from darkroom.worker.tuning import Attention, Tuning

    device = suite.device_info()
    out: dict[str, Any] = {}
    kernels = [Attention.SDPA, Attention.SLICING]
    if importlib.util.find_spec("xformers") is not None and device.device.startswith("cuda"):
        kernels.append(Attention.XFORMERS)
    else:
        out["xformers"] = "not measured: xformers is not installed" if device.device.startswith("cuda") else \
            "not measured: CUDA only"
    for kernel in kernels:
        pipe = load_pipeline(suite.model_path, device, suite.config.dtype, tuning=Tuning(attention=kernel))
        out[kernel.value] = _measure_bare(suite, pipe, 1)
        del pipe
        _free(suite.config.device)
    return out


def section_offload(suite: Suite) -> dict[str, Any]:
    import torch

    from darkroom.worker.pipelines import load_pipeline
    from darkroom.worker.tuning import Offload, Tuning

    device = suite.device_info()
    cuda = device.device.startswith("cuda")
    if cuda:  # the start-up check the worker makes (it refuses offload without CUDA)
        Tuning(cpu_offload=Offload.MODEL).check(device)
    out: dict[str, Any] = {"note": "" if cuda else "dry run: offload hooks on the CPU device (no transfers)"}
    if not cuda:  # accelerate's layer-by-layer hooks move weights to "meta" and back, which fails on the CPU
        out["sequential"] = "not run: CUDA only (dry run)"
    for mode in (Offload.MODEL, Offload.SEQUENTIAL) if cuda else (Offload.MODEL,):
        _reset_peak(suite.config.device)
        t0 = time.perf_counter()
        pipe = load_pipeline(suite.model_path, device, suite.config.dtype, tuning=Tuning(cpu_offload=mode))
        load = time.perf_counter() - t0
        if mode is Offload.MODEL:
            result = _measure_bare(suite, pipe, 1)
        else:  # layer by layer moves every weight at every step: one short call (2 denoising steps)
            t = time.perf_counter()
            _bare_call(suite, pipe, 1, steps=4, strength=0.5)
            _sync(suite.config.device)
            seconds = time.perf_counter() - t
            result = {"call_s": seconds, "steps": 2, "it_per_s": 2 / seconds}
        result["load_s"] = load
        result["peak_memory_bytes"] = _peak_memory(suite.config.device)
        if cuda:
            result["allocated_after_bytes"] = torch.cuda.memory_allocated()
        out[mode.value] = result
        del pipe
        _free(suite.config.device)
    return out


def section_memory_budget(suite: Suite) -> dict[str, Any]:
    from darkroom.common.errors import JobError
    from darkroom.worker.pipelines import module_bytes_all

    c = suite.config
    model = suite.model_path
    twin = _twin(suite)
    probe = suite.pipeline_cache(suite.registry({"a": model}, adapters=False))
    probe.get("a")
    one = probe.resident_bytes()
    shareable = module_bytes_all(probe.get_entry("a").pipeline) - one  # 0: each module counted once
    vae = sum(t.numel() * t.element_size() for t in probe.get_entry("a").pipeline.vae.parameters())
    probe.evict("a")
    del probe
    _free(c.device)
    budget = int(one * 1.5)  # one model fits, two do not (the twin shares the byte-identical VAE)
    models = suite.pipeline_cache(suite.registry({"a": model, "b": twin}, adapters=False), budget=budget)
    allocated = _allocated(c.device)
    t0 = time.perf_counter()
    models.get("a")
    load_a = time.perf_counter() - t0
    after_a = _allocated(c.device)
    t1 = time.perf_counter()
    models.get("b")
    load_b = time.perf_counter() - t1
    after_b = _allocated(c.device)
    t2 = time.perf_counter()
    models.get("a")
    reload_a = time.perf_counter() - t2
    result = {"model_bytes": one, "estimated_bytes": models._estimate_bytes(model, c.dtype), "vae_bytes": vae, "shared_double_count": shareable, "budget_bytes": budget,
              "load_a_s": load_a, "load_b_evicting_a_s": load_b, "reload_a_s": reload_a,
              "evictions": models.evictions, "resident": models.resident, "resident_bytes": models.resident_bytes(),
              "allocated_before_bytes": allocated, "allocated_after_a_bytes": after_a,
              "allocated_after_b_bytes": after_b}
    if models.evictions < 2 or models.resident_bytes() > budget:
        raise RuntimeError(f"the budget was not kept: {result}")
    small = suite.pipeline_cache(suite.registry({"a": model}, adapters=False), budget=one // 4)
    try:
        small.get("a")
        raise RuntimeError("a model larger than the budget loaded")
    except JobError as exc:
        result["too_large"] = f"{exc.code.value}: {exc}"
    _release(models)
    return result


def _twin(suite: Suite) -> Path:
    """The suite's model under another folder, so that it loads as a second model (hard links: no copy)."""
    twin = suite.config.workdir / "model-twin"
    if not twin.exists():
        shutil.copytree(suite.model_path, twin, copy_function=os.link)
    return twin


def section_load_beside(suite: Suite) -> dict[str, Any]:
    from darkroom.worker.inference.loads import ModelLoads

    c = suite.config
    models = suite.pipeline_cache(suite.registry({"bench": suite.model_path, "twin": _twin(suite)}, adapters=False))
    models.get("bench")
    darkroom = InProcessDarkroom(suite, models, batch=c.batch, loads=ModelLoads(models))
    darkroom.run(darkroom.jobs(c.batch, offset=900))  # warm: this batch size called once
    jobs = max(c.calls * c.batch, 2 * c.batch)
    calls_alone, _ = darkroom.run(darkroom.jobs(jobs))
    t0 = time.perf_counter()
    models.get("twin")
    _sync(c.device)
    load_alone = time.perf_counter() - t0
    models.evict("twin")
    _free(c.device)
    _reset_peak(c.device)
    # together: the twin's job first (its load starts on the loader thread), the resident model's jobs meanwhile
    together, results = darkroom.run([*darkroom.jobs(1, offset=950, model="twin"), *darkroom.jobs(jobs, offset=1000)])
    peak = _peak_memory(c.device)
    twin, resident = results[0], results[1:]
    result = {"jobs": jobs, "calls_alone_s": calls_alone, "load_alone_s": load_alone, "together_s": together,
              "overlap": (calls_alone + load_alone) / together, "twin_job_model_load_s": twin.model_load,
              "resident_jobs_model_load_s_max": max(r.model_load for r in resident),
              "loads_started": darkroom.engine.loads.started, "peak_memory_bytes": peak,
              "resident": models.resident}
    if twin.model_load <= 0 or result["resident_jobs_model_load_s_max"] > 0 or sorted(models.resident) != ["bench", "twin"]:
        raise RuntimeError(f"the load did not run beside the calls as expected: {result}")
    _release(models)
    return result


SECTIONS = [
    Section("environment", 5, section_environment, needs=()),
    Section("build", 40, section_build, needs=()),
    Section("bare_eager", 30, section_bare_eager),
    Section("darkroom_eager", 35, section_darkroom_eager),
    Section("mixed_lora", 40, section_mixed_lora),
    Section("lora_switch", 15, section_lora_switch),
    Section("memory_budget", 30, section_memory_budget),
    Section("load_beside", 40, section_load_beside),
    Section("attention", 25, section_attention),
    Section("offload", 40, section_offload),
    Section("bare_compiled", 120, section_bare_compiled),
    Section("darkroom_compiled", 150, section_darkroom_compiled),
]


# -- device helpers ------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()


def _peak_memory(device: str) -> int:
    """torch.cuda.max_memory_allocated on CUDA; the process's peak RSS on the CPU."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.max_memory_allocated())
    return int(_common.peak_rss_bytes())


def _allocated(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.memory_allocated())
    return int(_common.rss_bytes())


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, int | str | bool) or value is None:
        return value
    return str(value)


# -- output --------------------------------------------------------------------------------------------
def rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    c = report["config"]
    sections = report["sections"]
    env = sections.get("environment", {}).get("results", {})
    b = c["batch"]
    out = [("run", f"{'DRY RUN, tiny model' if report['dry_run'] else 'SD 1.5 shapes, random weights'}, "
                   f"{c['size']}x{c['size']} {c['dtype']}, {int(c['steps'] * c['strength'])} steps per call, on "
                   f"{env.get('device_name', c['device'])}")]

    def res(name: str) -> dict[str, Any]:
        record = sections.get(name, {})
        return record.get("results", {}) if record.get("status") == "ok" else {}

    for name in ("bare_eager", "bare_compiled"):
        r = res(name)
        if r:
            out.append((name, f"b1 {r['b1']['it_per_s']:.2f} it/s ({r['b1']['images_per_s']:.2f} img/s), "
                              f"b{b} {r[f'b{b}']['it_per_s']:.2f} it/s ({r[f'b{b}']['images_per_s']:.2f} img/s); "
                              f"first call {r['b1']['first_call_s']:.1f} s"))
    for name in ("darkroom_eager", "darkroom_compiled"):
        r = res(name)
        if r:
            out.append((name, f"(c) {r['c']['images_per_s']:.2f} img/s, ÷ bare b1 {r.get('c/bare_b1', float('nan')):.3f}; "
                              f"(d) {r['d']['images_per_s']:.2f} img/s (mean call {r['d']['mean_call_jobs']:.1f}), "
                              f"÷ bare b{b} {r.get(f'd/bare_b{b}', float('nan')):.3f}"))
    r = res("mixed_lora")
    if r:
        out.append(("mixed_lora", f"{r['loras']} LoRAs resident: {r['mixed']['images_per_s']:.2f} img/s, mean call "
                                  f"{r['mixed']['mean_call_jobs']:.1f}, routing {r['mixed']['routing']}, "
                                  f"÷ darkroom (d) {r.get('mixed/darkroom_d', float('nan')):.3f}"))
    r = res("lora_switch")
    if r:
        out.append(("lora_switch", f"first load {r['first_load_ms_median']:.1f} ms, switch {r['switch_ms_median']:.2f} "
                                   f"ms (max {r['switch_ms_max']:.2f}), blend {r['blend_ms']:.1f} ms"))
    r = res("memory_budget")
    if r:
        out.append(("memory_budget", f"model {r['model_bytes'] / 2**20:,.0f} MiB, budget {r['budget_bytes'] / 2**20:,.0f}"
                                     f" MiB: load {r['load_a_s']:.2f} s, load+evict {r['load_b_evicting_a_s']:.2f} s, "
                                     f"reload {r['reload_a_s']:.2f} s, {r['evictions']} evictions"))
    r = res("load_beside")
    if r:
        out.append(("load_beside", f"{r['jobs']} jobs {r['calls_alone_s']:.2f} s + load {r['load_alone_s']:.2f} s alone, "
                                   f"{r['together_s']:.2f} s with the load beside them: overlap {r['overlap']:.2f}"))
    r = res("attention")
    if r:
        out.append(("attention", ", ".join(f"{k} {v['it_per_s']:.2f} it/s" for k, v in r.items() if isinstance(v, dict))
                    + "".join(f"; {k}: {v}" for k, v in r.items() if isinstance(v, str))))
    r = res("offload")
    if r:
        out.append(("offload", "; ".join(
            f"{mode} {v['it_per_s']:.2f} it/s (peak {v['peak_memory_bytes'] / 2**20:,.0f} MiB)" if isinstance(v, dict)
            else f"{mode}: {v}" for mode, v in r.items() if mode != "note")))
    peak = max((s.get("peak_memory_bytes", 0) for s in sections.values()), default=0)
    out.append(("peak memory", f"{peak / 2**20:,.0f} MiB "
                               f"({'torch.cuda.max_memory_allocated' if c['device'].startswith('cuda') else 'peak RSS'})"))
    for name, record in sections.items():
        out.append((f"  {name}", f"{record['status']} in {record.get('seconds', 0):.1f} s"
                                 + (f": {record.get('reason') or record.get('error')}"
                                    if record["status"] != "ok" else "")))
    return out


def default_out() -> Path:
    base = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(".darkroom/bench")
    return base / "gpu_suite.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU, small counts (about a minute)")
    parser.add_argument("--out", type=Path, default=None, help="JSON report (default: $OUT/gpu_suite.json if OUT is "
                                                               "set, else .darkroom/bench/gpu_suite.json)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="skip sections that no longer fit (seconds)")
    parser.add_argument("--sections", default="", help="comma-separated subset (default: all; see --list)")
    parser.add_argument("--list", action="store_true", help="print the sections and their estimated GPU seconds")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    parser.add_argument("--batch", type=int, default=None, help="the large batch size (default 8; 4 with --dry-run)")
    parser.add_argument("--steps", type=int, default=None, help="num_inference_steps (default 20; 4 with --dry-run)")
    parser.add_argument("--strength", type=float, default=0.75)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--size", type=int, default=None, help="input side in pixels (512; 64 with --dry-run)")
    parser.add_argument("--calls", type=int, default=None, help="timed calls per measurement (5; 2 with --dry-run)")
    parser.add_argument("--loras", type=int, default=10, help="resident LoRAs in mixed_lora and lora_switch")
    parser.add_argument("--lora-rank", type=int, default=None, help="rank of the random LoRAs (16; 4 with --dry-run)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (inductor; eager with --dry-run: inductor takes minutes on a CPU)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the model is built (default: a temp folder)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads on a CPU device (default 1)")
    parser.add_argument("--inject-failure", default="", help=argparse.SUPPRESS)  # tests: sections that raise
    args = parser.parse_args(argv)
    if args.list:
        print(table([(s.name, f"~{s.estimate_s:.0f} s") for s in SECTIONS]))
        return 0
    dry = args.dry_run
    device = args.device or ("cpu" if dry else "cuda")
    wanted = [s for s in SECTIONS if not args.sections or s.name in args.sections.split(",")]
    unknown = set(filter(None, args.sections.split(","))) - {s.name for s in SECTIONS}
    if unknown:
        parser.error(f"--sections: unknown {', '.join(sorted(unknown))}; allowed: {', '.join(s.name for s in SECTIONS)}")
    if not dry and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available here; use --dry-run (or --device cpu) on this machine")
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="darkroom-gpu-suite-")))
        config = Config(dry_run=dry, device=device, dtype="float16" if device.startswith("cuda") else "float32",
                        size=args.size or (64 if dry else 512), steps=args.steps or (4 if dry else 20),
                        strength=args.strength, guidance=args.guidance, batch=args.batch or (4 if dry else 8),
                        calls=args.calls or (2 if dry else 5), loras=args.loras,
                        lora_rank=args.lora_rank or (4 if dry else 16),
                        compile_backend=args.compile_backend or ("eager" if dry else "inductor"),
                        budget_s=args.budget_s, workdir=workdir,
                        inject_failure=tuple(filter(None, args.inject_failure.split(","))))
        if not device.startswith("cuda"):  # one thread: on a shared CPU two stall each other (bench/README.md)
            import torch

            torch.set_num_threads(args.threads)
        suite = Suite(config, args.out or default_out())
        suite.run(wanted)
    print(table(suite.report["table"]))
    print(f"report: {suite.out}")
    failed = [n for n, r in suite.report["sections"].items() if r["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
