"""Choosing the device and dtype a worker process computes on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from darkroom.common.errors import ConfigurationError

if TYPE_CHECKING:
    import torch

__all__ = ["DeviceInfo", "select_device", "resolve_dtype"]

_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class DeviceInfo:
    """The device this process owns and what it reports about itself."""

    device: str
    dtype: str
    name: str
    total_memory: int | None = None

    def torch_device(self) -> torch.device:
        import torch

        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        import torch

        dtype: torch.dtype = getattr(torch, self.dtype)
        return dtype

    def default_budget(self) -> int:
        """Bytes of resident weights by default: 70% of GPU memory, or half the machine's RAM."""
        if self.total_memory:
            return int(self.total_memory * 0.7)
        import os

        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.5)

    def free_memory(self) -> int | None:
        """Free device memory in bytes (CUDA only)."""
        import torch

        if self.device.startswith("cuda"):
            free, _total = torch.cuda.mem_get_info(torch.device(self.device))
            return int(free)
        return None


def select_device(requested: str = "auto", dtype: str = "auto") -> DeviceInfo:
    """Resolve ``auto`` to CUDA when present (fp16), else CPU (fp32); check explicit choices now, not mid-job."""
    import torch

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigurationError(f"device {requested!r} requested but CUDA is not available")
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return DeviceInfo(f"cuda:{index}", resolve_dtype(dtype, "cuda"), props.name, int(props.total_memory))
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigurationError("device 'mps' requested but MPS is not available")
        return DeviceInfo("mps", resolve_dtype(dtype, "mps"), "Apple MPS")
    if device.type != "cpu":
        raise ConfigurationError(f"unsupported device {requested!r}: use auto, cpu, cuda, cuda:N or mps")
    return DeviceInfo("cpu", resolve_dtype(dtype, "cpu"), "cpu")


def resolve_dtype(requested: str, device_type: str) -> str:
    """``auto`` is float16 on GPUs and float32 on CPUs; float16 on a CPU is refused (diffusers does not support
    it there: slow or failing kernels), bfloat16 works there but is slow without AVX-512."""
    if requested == "auto":
        return "float16" if device_type in {"cuda", "mps"} else "float32"
    try:
        dtype = _DTYPES[requested.lower()]
    except KeyError:
        raise ConfigurationError(f"unknown dtype {requested!r}; use auto, float32, float16 or bfloat16") from None
    if dtype == "float16" and device_type == "cpu":
        raise ConfigurationError(f"dtype {requested!r} on a CPU: diffusers pipelines do not run in float16 there; "
                                 "use float32 (or bfloat16), or run on a GPU")
    return dtype
