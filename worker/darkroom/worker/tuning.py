"""How a worker's pipelines run: attention kernel, slicing, fused QKV, channels-last, compile, offload.

Attention kernel, VAE slicing/tiling, fused QKV, channels-last, torch.compile, CPU offload. Chosen once per worker (``DARKROOM_*`` settings), checked against the device at start-up,
applied to every pipeline as it loads, and reported in the worker's heartbeat.

A setting that cannot work here (xFormers not installed, offload without CUDA, no working compiler for
torch.compile, an option that would silently bypass LoRA adapters) stops the worker at start-up with
what to change, never mid-job.

Compatibility with LoRA adapters (and mixed-adapter batching):

* ``fuse_qkv``: diffusers' ``FusedAttnProcessor2_0`` reads new ``to_qkv``/``to_kv`` projections made
  from the base weights; LoRA layers on ``to_q``/``to_k``/``to_v`` are never called, so adapters would
  be silently ignored. Allowed only when every model refuses adapters (registry ``adapters = []``).
* ``compile``: a compiled denoiser with peft's LoRA layers recompiles whenever the active adapters or
  their scales change (dynamo guards on peft's state), and forward hooks added after compiling
  (mixed-adapter batching) are not seen. So a compiled worker holds adapters in slots (:mod:`.slotted`:
  fixed buffers, per-sample weights as a tensor), where switching, blending and mixing never recompile;
  ``DARKROOM_ADAPTER_LAYERS=peft`` with compile is allowed only for models that take no adapters.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from darkroom.common.errors import ConfigurationError

if TYPE_CHECKING:
    from .device import DeviceInfo
    from .registry import ModelRegistry
    from .settings import WorkerSettings

__all__ = ["Attention", "Offload", "Tuning"]

log = logging.getLogger(__name__)


class Attention(StrEnum):
    """The attention kernel: torch's scaled_dot_product_attention (diffusers' default), xFormers, or sliced."""

    SDPA = "sdpa"
    XFORMERS = "xformers"
    SLICING = "slicing"


class Offload(StrEnum):
    """Keeping weights in CPU memory: none, whole models moved to the GPU in turn, or layer by layer."""

    NONE = "none"
    MODEL = "model"
    SEQUENTIAL = "sequential"


@dataclass(frozen=True)
class Tuning:
    """The pipeline options of one worker process."""

    attention: Attention = Attention.SDPA
    vae_slicing: bool = False
    vae_tiling: bool = False
    fuse_qkv: bool = False
    channels_last: bool = False
    compile: bool = False
    cpu_offload: Offload = Offload.NONE
    adapter_slots: bool = False  # LoRA layers in fixed slot buffers (:mod:`.slotted`) rather than peft's
    lora_max_rank: int = 16  # with slots: the rank each slot holds
    warmup_sizes: tuple[tuple[int, int], ...] = ((512, 512),)  # with compile: compiled as each model loads
    warmup_batch: int = 8  # with compile: every batch size 1..this is run at each warm-up size (batch_max_images)

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> Tuning:
        slots = settings.adapter_layers == "slots" or (settings.adapter_layers == "auto" and settings.compile)
        return cls(Attention(settings.attention), settings.vae_slicing, settings.vae_tiling, settings.fuse_qkv,
                   settings.channels_last, settings.compile, Offload(settings.cpu_offload), slots,
                   settings.lora_max_rank, settings.warmup_sizes, settings.batch_max_images)

    def describe(self) -> dict[str, Any]:
        """The options as the worker reports them (``darkroom workers``)."""
        described = {k: v.value if isinstance(v, StrEnum) else v for k, v in asdict(self).items()}
        described["warmup_sizes"] = ",".join(f"{w}x{h}" for w, h in self.warmup_sizes)
        if not self.adapter_slots:  # these two only mean something on the path that uses them
            del described["lora_max_rank"]
        if not self.compile:
            del described["warmup_sizes"], described["warmup_batch"]
        return described

    # -- start-up ----------------------------------------------------------------------------------
    def check(self, device: DeviceInfo, registry: ModelRegistry | None = None) -> None:
        """Raise :class:`ConfigurationError` naming every option that cannot apply on ``device`` with ``registry``."""
        problems = [*self._device_problems(device), *self._combination_problems(registry)]
        if self.compile and not problems:
            problems += _compiler_problems(device)
        if problems:
            raise ConfigurationError("pipeline settings that cannot apply on this worker:\n  - "
                                     + "\n  - ".join(problems))

    def _device_problems(self, device: DeviceInfo) -> list[str]:
        problems = []
        cuda = device.device.startswith("cuda")
        if self.attention is Attention.XFORMERS:
            if importlib.util.find_spec("xformers") is None:
                problems.append("DARKROOM_ATTENTION=xformers: xformers is not installed; install the xformers "
                                "build that matches your torch, or use sdpa (the default)")
            elif not cuda:
                problems.append(f"DARKROOM_ATTENTION=xformers: xFormers attention runs on CUDA only and this worker "
                                f"runs on {device.device}; use sdpa or slicing")
        if self.cpu_offload is not Offload.NONE and not cuda:
            problems.append(f"DARKROOM_CPU_OFFLOAD={self.cpu_offload.value}: offloading moves weights between CPU "
                            f"memory and a CUDA GPU, and this worker runs on {device.device}; set it to none")
        return problems

    def _combination_problems(self, registry: ModelRegistry | None) -> list[str]:
        problems = []
        if self.fuse_qkv and self.attention is not Attention.SDPA:
            problems.append(f"DARKROOM_FUSE_QKV=true replaces the attention kernel with diffusers' fused SDPA "
                            f"processor, so DARKROOM_ATTENTION={self.attention.value} would not apply; use one of them")
        if self.compile and self.cpu_offload is Offload.SEQUENTIAL:
            problems.append("DARKROOM_COMPILE=true with DARKROOM_CPU_OFFLOAD=sequential: weights move in and out "
                            "of the GPU at every layer, which a compiled graph cannot hold; use model offload or none")
        with_ip = [m.id for m in registry or () if m.ip_adapter is not None]
        if with_ip and (self.attention is Attention.SLICING or self.fuse_qkv):
            flag = "DARKROOM_ATTENTION=slicing" if self.attention is Attention.SLICING else "DARKROOM_FUSE_QKV=true"
            problems.append(f"{flag} replaces every attention processor, the IP-Adapter's included, and models "
                            f"{', '.join(with_ip)} have an IP-Adapter; use sdpa (the default) or xformers, or "
                            "remove their ip_adapter")
        takes_adapters = [m.id for m in registry or () if m.allowed_adapters is None or m.allowed_adapters]
        for flag, why in (("fuse_qkv", "fused QKV projections bypass LoRA layers (adapters would be silently "
                                       "ignored)"),
                          ("compile", "a compiled denoiser with peft's LoRA layers recompiles at every adapter "
                                      "change (use DARKROOM_ADAPTER_LAYERS=slots or auto)")):
            if getattr(self, flag) and takes_adapters and not (flag == "compile" and self.adapter_slots):
                problems.append(f"DARKROOM_{flag.upper()}=true: {why}, and models {', '.join(takes_adapters)} "
                                "accept adapters; give each model `adapters = []` in the registry file (jobs with "
                                f"adapters then fail with adapter_not_allowed) or turn {flag} off")
        return problems

    # -- per pipeline --------------------------------------------------------------------------------
    def apply(self, pipe: Any, device: DeviceInfo) -> None:
        """Place a freshly loaded pipeline on ``device`` (or offload it) and apply every option."""
        import torch

        if self.cpu_offload is Offload.MODEL:
            pipe.enable_model_cpu_offload(device=device.torch_device())
        elif self.cpu_offload is Offload.SEQUENTIAL:
            pipe.enable_sequential_cpu_offload(device=device.torch_device())
        else:
            pipe.to(device.torch_device())
        if self.attention is Attention.SLICING:
            pipe.enable_attention_slicing()
        elif self.attention is Attention.XFORMERS:
            pipe.enable_xformers_memory_efficient_attention()
        if self.vae_slicing:
            pipe.vae.enable_slicing()
        if self.vae_tiling:
            pipe.vae.enable_tiling()
        if self.fuse_qkv:
            pipe.fuse_qkv_projections()
        if self.channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
        if self.compile:  # in place: the module (its config, its adapters API) keeps its class
            from .dynamic_batch import compile_dynamic_batch

            compile_dynamic_batch(pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer)

    def warm_up(self, pipe: Any) -> float:
        """Compile ``pipe``'s denoiser now for every warm-up size at every batch size 1..``warmup_batch`` (seconds).

        The denoiser's batch dimension is dynamic from its first trace (:mod:`.dynamic_batch`), but one dynamic
        graph does not cover every batch size: operators guard on ranges of it (on CPU, inductor's convolution
        changes algorithm at 16 rows, so with classifier-free guidance batch 8 needs a second graph; diffusers'
        upsampling branches at 64 rows). Running each batch size the worker can form traces exactly the graphs
        its calls will need, and a size that falls in a range already traced only runs two cheap steps.
        Without guidance batch 1 is specialized (dynamo's 0/1 rule); the warm-up runs with guidance, as nearly
        every job does. Recompiles during the warm-up are expected and not counted (:func:`.recompiles.baseline`).
        """
        import time

        from PIL import Image

        from . import recompiles

        if not self.compile:
            return 0.0
        started = time.perf_counter()
        for width, height in self.warmup_sizes:
            image = Image.new("RGB", (width, height), (127, 127, 127))
            for batch in range(1, max(1, self.warmup_batch) + 1):
                pipe(prompt=["warm-up"] * batch, image=[image] * batch, strength=1.0, num_inference_steps=2,
                     output_type="latent")
        recompiles.baseline()
        seconds = time.perf_counter() - started
        log.info("compiled %s for %s at batch 1 to %d in %.1f s", type(pipe).__name__,
                 ", ".join(f"{w}x{h}" for w, h in self.warmup_sizes), self.warmup_batch, seconds)
        return seconds

    @property
    def shares_components(self) -> bool:
        """Whether identical components may be shared between pipelines (offload hooks are per pipeline)."""
        return self.cpu_offload is Offload.NONE


def _compiler_problems(device: DeviceInfo) -> list[str]:
    """Whether torch.compile works on the device: a probe passed before with this torch and compiler (its
    marker in the compile cache folder, :func:`.compile_cache.probe_marker`), else the probe itself."""
    import torch

    from .compile_cache import probe_marker

    marker = probe_marker(device.device, torch.__version__)
    if marker is not None and marker.is_file():
        log.info("torch.compile works on %s (probe passed before: %s)", device.device, marker.name)
        return []
    problems = _run_compiler_probe(device)
    if not problems and marker is not None:
        _remember_probe(marker)
    return problems


def _remember_probe(marker: Path) -> None:
    try:
        marker.write_text("torch.compile probe passed\n")
    except OSError as exc:  # the cache folder is checked writable at start-up; this only costs the next probe
        log.warning("could not record the passed compiler probe in %s (%s)", marker, exc.strerror)


def _run_compiler_probe(device: DeviceInfo) -> list[str]:
    """Compile and run a two-op function on the device: the cheapest honest test that torch.compile works."""
    import torch

    def probe(x: Any) -> Any:
        return x * 2 + 1

    try:
        torch.compile(probe)(torch.ones(8, device=device.torch_device()))
    except Exception as exc:  # noqa: BLE001 - inductor fails in many ways (no compiler, no triton, ...)
        lines = [line.strip() for line in str(exc).splitlines() if line.strip() and not line.rstrip().endswith(":")]
        first = lines[0] if lines else type(exc).__name__
        need = "triton (for CUDA)" if device.device.startswith("cuda") else "a C++ compiler (g++ or clang; CXX)"
        return [f"DARKROOM_COMPILE=true: torch.compile does not work on {device.device} here ({first}); install "
                f"{need} or set DARKROOM_COMPILE=false"]
    return []
