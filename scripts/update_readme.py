"""Regenerate the README's reference tables from the code (``make docs``)."""

from __future__ import annotations

import re
from pathlib import Path

from darkroom.common.reference import job_fields_markdown, settings_markdown
from darkroom.common.settings import Settings
from darkroom.producer.dashboard.settings import DashboardSettings
from darkroom.producer.dispatcher import DispatcherSettings
from darkroom.worker.settings import WorkerSettings

README = Path(__file__).resolve().parents[1] / "README.md"


def main() -> None:
    text = README.read_text()
    blocks = {
        "job-fields": job_fields_markdown(),
        "settings": settings_markdown(),
        "worker-settings": settings_markdown(WorkerSettings, skip=Settings),
        "dispatcher-settings": settings_markdown(DispatcherSettings, skip=Settings),
        "dashboard-settings": settings_markdown(DashboardSettings, skip=Settings),
    }
    for name, body in blocks.items():
        text, count = re.subn(
            rf"(<!-- {name}:start -->\n).*?(\n<!-- {name}:end -->)", lambda m, body=body: m.group(1) + body + m.group(2), text,
            flags=re.S,
        )
        if count != 1:
            raise SystemExit(f"README.md has no {name} block")
    README.write_text(text)


if __name__ == "__main__":
    main()
