"""torch.compile's on-disk caches in the worker's own cache folder, so a restarted worker starts warm.

Inductor keeps what it compiled (the FX graph cache: generated code and built kernels; the AOTAutograd
cache) under ``TORCHINDUCTOR_CACHE_DIR``, by default a
per-user folder in the system temp directory, which containers and reboots often wipe. A worker puts it
under its state folder instead (``<state_dir>/cache/torch-compile``, beside the model file cache), so the
next worker on the host (after a restart, a scale-up from zero) finds the kernels already built and its
first compiled call costs tracing, not code generation. Both caches are keyed on the graph, the shapes,
the torch version and the configuration, so a stale entry is never used; several workers of a host share
the folder safely (inductor writes entries atomically). Dynamo's own tracing is not cached: each process
traces the denoiser again (once per warm-up size, :mod:`.dynamic_batch`). Dynamo's profile of dynamic
dimensions (kept there only with ``torch.compiler.config.job_id`` set) is not used: it does not match
diffusers' denoisers across processes (see :mod:`.dynamic_batch`).

An operator's own ``TORCHINDUCTOR_CACHE_DIR`` wins (e.g. a shared volume), unless it names torch's
default folder: torch writes that default into the environment itself once it resolves the folder (importing
``torch._dynamo`` does), so that value cannot be told from an operator's and is replaced. This must run before torch
compiles anything (the worker's start-up check compiles a probe), which :func:`use_worker_compile_cache`
does from ``darkroom worker`` right after the settings load; the FX graph and AOTAutograd caches are on by
default in torch 2.4 and later, and their own switches (``TORCHINDUCTOR_FX_GRAPH_CACHE``,
``TORCHINDUCTOR_AUTOGRAD_CACHE``) are left as the operator set them.

The folder also remembers that the worker's start-up compiler probe passed (:func:`probe_marker`): a file
named after the torch version, the device type and the compiler (CPU: the C++ compiler inductor runs, ``CXX`` or
``g++``, by path, size and modification time; CUDA: triton's version). A worker that finds it skips the probe's
compile; the inductor modules the probe imported (most of its cost with a warm cache) are then imported by the
warm-up, which needs them anyway. Another torch, compiler or device runs the probe again, so a missing
compiler still stops the worker at start-up with a clear error.
"""

from __future__ import annotations

import getpass
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import MutableMapping
from pathlib import Path

__all__ = ["CACHE_ENV", "compile_cache_dir", "compiler_identity", "probe_marker", "use_worker_compile_cache"]

log = logging.getLogger(__name__)

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
FOLDER = "torch-compile"


def torch_default_cache_dir() -> Path:
    """The folder torch.compile uses when ``TORCHINDUCTOR_CACHE_DIR`` is unset (``<tmp>/torchinductor_<user>``)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        return Path(default_cache_dir()).absolute()
    except (ImportError, AttributeError):  # moved in another torch: its documented default
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = f"uid_{os.getuid()}"
        return Path(tempfile.gettempdir(), "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user)).absolute()


def compile_cache_dir(state_dir: Path, environ: MutableMapping[str, str] | None = None,
                      torch_default: Path | None = None) -> tuple[Path, bool]:
    """The folder torch.compile's caches should use, and whether the operator chose it (``TORCHINDUCTOR_CACHE_DIR``
    naming another folder than ``torch_default``, torch's own default)."""
    env = os.environ if environ is None else environ
    chosen = env.get(CACHE_ENV, "").strip()
    if chosen:
        folder = Path(chosen).expanduser().absolute()
        if folder != (torch_default if torch_default is not None else torch_default_cache_dir()):
            return folder, True
    return (Path(state_dir) / "cache" / FOLDER).expanduser().absolute(), False


def use_worker_compile_cache(state_dir: Path, compile_enabled: bool = True,
                             environ: MutableMapping[str, str] | None = None,
                             torch_default: Path | None = None) -> Path | None:
    """Point torch.compile's caches at the worker's cache folder (unless the operator chose one); return it.

    Does nothing (returns None) when the worker does not compile. The folder is created here, so a
    folder that cannot be written stops the worker at start-up with its path, not mid-job.
    """
    if not compile_enabled:
        return None
    env = os.environ if environ is None else environ
    folder, chosen = compile_cache_dir(state_dir, env, torch_default)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from darkroom.common.errors import ConfigurationError

        source = CACHE_ENV if chosen else "DARKROOM_STATE_DIR"
        raise ConfigurationError(f"torch.compile cache folder {folder} cannot be created ({exc.strerror}); make it "
                                 f"writable or point {source} elsewhere") from None
    env[CACHE_ENV] = str(folder)
    log.info("torch.compile cache: %s (%s)", folder, f"from {CACHE_ENV}" if chosen else "the worker's cache folder")
    return folder


PROBE_PREFIX = "compiler-probe-passed-"


def _cpp_compiler(environ: MutableMapping[str, str]) -> str:
    """The C++ compiler inductor runs on a CPU (its ``config.cpp.cxx``): ``CXX``, else ``g++``, with its file's
    path, size and modification time, or ``missing`` where no such file is found."""
    name = environ.get("CXX") or "g++"
    found = shutil.which(name, path=environ.get("PATH"))
    if found is None:
        return f"{name}: missing"
    real = os.path.realpath(found)
    try:
        stat = os.stat(real)
    except OSError:
        return f"{name}: missing"
    return f"{name}: {real} {stat.st_size} {stat.st_mtime_ns}"


def _triton_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return "triton " + version("triton")
    except PackageNotFoundError:
        return "triton: missing"


def compiler_identity(device: str, torch_version: str, environ: MutableMapping[str, str] | None = None) -> str:
    """What a passed compiler probe depends on: torch's version, the device type and its compiler."""
    env = os.environ if environ is None else environ
    kind = device.split(":", 1)[0]
    compiler = _triton_version() if kind == "cuda" else _cpp_compiler(env)
    return f"torch {torch_version}; {kind}; {compiler}"


def probe_marker(device: str, torch_version: str, environ: MutableMapping[str, str] | None = None) -> Path | None:
    """The file that says the compiler probe passed for ``device`` with this torch and compiler, in the compile
    cache folder (``TORCHINDUCTOR_CACHE_DIR``, set by :func:`use_worker_compile_cache`); None where none is set."""
    env = os.environ if environ is None else environ
    folder = env.get(CACHE_ENV, "").strip()
    if not folder:
        return None
    digest = hashlib.sha256(compiler_identity(device, torch_version, env).encode()).hexdigest()[:16]
    return Path(folder) / (PROBE_PREFIX + digest)
