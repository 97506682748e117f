"""Helpers shared by the benchmarks: quiet libraries, RSS, timing."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from darkroom.worker.libs import quiet_libraries

quiet_libraries()


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def rss_bytes() -> int:
    """Resident set size of this process, from /proc (Linux)."""
    return _proc_status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process."""
    return _proc_status_bytes("VmHWM")


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
