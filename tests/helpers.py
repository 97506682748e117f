"""Helpers shared by unit and integration tests (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def png_bytes(image: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # type: ignore[attr-defined]
    return buffer.getvalue()


def wait_until(probe: Callable[[], T], timeout: float = 60.0, what: str = "the condition", *,
               every: float = 0.05) -> T:
    """Poll ``probe`` until it returns something truthy, and return that; fail naming ``what`` after ``timeout``.

    Tests wait on an observable event this way (a record, a history entry, a Redis key, a log line, a metric),
    never on a fixed sleep.
    """
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(every)
    return value
