"""Taming third-party libraries' output in worker processes (called by entrypoints, never at import)."""

from __future__ import annotations

import os

__all__ = ["quiet_libraries"]


def quiet_libraries() -> None:
    """No hub lookups, no progress bars, no torchvision fallback notices in our logs."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
