"""Helpers shared by the benchmarks: quiet libraries, RSS, timing."""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from darkroom.worker.libs import quiet_libraries

quiet_libraries()


def _proc_status_bytes(field: str, pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/{pid}/status")


def rss_bytes() -> int:
    """Resident set size of this process, from /proc (Linux)."""
    return _proc_status_bytes("VmRSS")


def peak_rss_bytes(pid: int | None = None) -> int:
    """Peak resident set size of this process, or of process ``pid`` (a worker, say)."""
    return _proc_status_bytes("VmHWM", "self" if pid is None else pid)


def median_seconds(fn: Callable[[], object], repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def settings_for(endpoints: Any, state_dir: Path) -> Any:
    """Darkroom settings pointing at embedded services (``EmbeddedServices.up()``'s endpoints)."""
    from darkroom.common.settings import Settings

    env = endpoints.as_env()
    return Settings(state_dir=state_dir, redis_url=env["DARKROOM_REDIS_URL"],
                    s3_endpoint_url=env["DARKROOM_S3_ENDPOINT_URL"], s3_access_key_id=env["DARKROOM_S3_ACCESS_KEY_ID"],
                    s3_secret_access_key=env["DARKROOM_S3_SECRET_ACCESS_KEY"], s3_region=env["DARKROOM_S3_REGION"])


@contextlib.contextmanager
def embedded_services(folder: Path) -> Iterator[tuple[Any, Any]]:
    """Start a private Redis and S3 server under ``folder``; yield (endpoints, settings); stop them after."""
    from darkroom.dev.embedded import EmbeddedServices

    print("starting embedded Redis and S3 ...", file=sys.stderr)
    services = EmbeddedServices(folder / "services")
    endpoints = services.up(timeout=60)
    try:
        yield endpoints, settings_for(endpoints, folder / "state")
    finally:
        services.down()


def ratio_rows(rate: dict[str, float], ratios: dict[str, tuple[str, str]],
               targets: dict[str, float]) -> list[tuple[str, str]]:
    """Table rows for measured ratios (e.g. ``{"c/a": ("c", "a")}``), each against its target if it has one."""
    out = []
    for name, (top, bottom) in ratios.items():
        if top in rate and bottom in rate:
            value = rate[top] / rate[bottom]
            target = targets.get(name)
            verdict = "" if target is None else f"   target >= {target}: {'met' if value >= target else 'NOT met'}"
            out.append((name, f"{value:.3f}{verdict}"))
    return out
