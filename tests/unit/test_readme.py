"""The README's reference tables are generated from the code; this keeps them true."""

from __future__ import annotations

import re
from pathlib import Path

from darkroom.common.reference import job_fields_markdown, settings_markdown
from darkroom.common.settings import Settings
from darkroom.worker.settings import WorkerSettings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def block(name: str) -> str:
    match = re.search(rf"<!-- {name}:start -->\n(.*?)\n<!-- {name}:end -->", README, re.S)
    assert match, f"README has no {name} block"
    return match.group(1)


def test_job_field_table_matches_the_model() -> None:
    assert block("job-fields") == job_fields_markdown(), "regenerate with: make docs"


def test_settings_tables_match_the_settings() -> None:
    assert block("settings") == settings_markdown()
    assert block("worker-settings") == settings_markdown(WorkerSettings, skip=Settings)


def test_readme_starts_with_the_two_commands() -> None:
    head = README[:600]
    assert "make demo" in head and "make test" in head
