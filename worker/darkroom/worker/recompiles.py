"""Recompiles of a compiled denoiser, counted and logged with the guard that failed.

torch.compile records every guard failure that made it compile a function again
(``torch._dynamo.utils.guard_failures``: code object -> reasons). :func:`check` reads what is new since
its last call (the engine calls it after each pipeline call when ``DARKROOM_COMPILE`` is on), logs each
reason once and adds it to :func:`total` (``darkroom_recompiles_total``). A worker whose shapes and
adapters stay within what it compiled at start-up should keep this at 0.
"""

from __future__ import annotations

import logging
import sys
import threading

__all__ = ["baseline", "check", "total"]

log = logging.getLogger(__name__)

_lock = threading.Lock()
_seen: dict[object, int] = {}  # code object -> guard failures already counted
_total = 0


def check(context: str = "") -> int:
    """Count and log the recompiles since the last check; returns how many were new."""
    global _total  # noqa: PLW0603 - one process-wide count, like torch's own
    dynamo = sys.modules.get("torch._dynamo.utils")
    if dynamo is None:  # nothing was ever compiled in this process
        return 0
    new = 0
    with _lock:
        for code, reasons in list(dynamo.guard_failures.items()):
            seen = _seen.get(code, 0)
            for reason in reasons[seen:]:
                log.warning("recompiled %s%s: guard failed: %s", getattr(code, "co_name", code),
                            f" ({context})" if context else "", reason)
            new += max(0, len(reasons) - seen)
            _seen[code] = len(reasons)
        _total += new
    return new


def baseline() -> None:
    """Take every recompile so far as expected (a warm-up's): neither logged nor counted."""
    dynamo = sys.modules.get("torch._dynamo.utils")
    with _lock:
        for code, reasons in list(dynamo.guard_failures.items()) if dynamo is not None else ():
            _seen[code] = len(reasons)


def total() -> int:
    """Recompiles counted by :func:`check` in this process."""
    return _total
