"""``darkroom dashboard``: a web view of the fleet, its queues, jobs, outputs and augmentation runs.

Install with ``pip install 'darkroom-producer[dashboard]'``. The web stack (Starlette, uvicorn,
Jinja2) is imported only when the dashboard runs, never by the SDK.
"""

from __future__ import annotations

from .settings import DashboardSettings

__all__ = ["DashboardSettings"]
