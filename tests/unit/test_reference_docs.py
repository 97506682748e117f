"""The documentation's reference pages are generated from the code; these tests keep them true,
keep the README a front door, and build the site strictly (a broken link fails)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from darkroom.common.errors import ErrorCode
from darkroom.common.reference import ERROR_CODE_MEANINGS

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("update_reference", ROOT / "scripts" / "update_reference.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["job-fields", "settings", "worker-settings", "dispatcher-settings",
                                  "dashboard-settings", "error-codes", "metrics", "cli", "modules"])
def test_reference_page_matches_the_code(name: str) -> None:
    page, body = _generator().blocks()[name]
    text = (ROOT / "docs" / "reference" / page).read_text()
    match = re.search(rf"<!-- {name}:start -->\n(.*?)\n<!-- {name}:end -->", text, re.S)
    assert match, f"docs/reference/{page} has no {name} block"
    assert match.group(1) == body, "stale: regenerate with make docs"


def test_where_things_live_lists_every_module_with_a_one_line_summary() -> None:
    generator = _generator()
    for folder in generator.DISTRIBUTIONS:
        for package_dir in (p for p in (ROOT / folder / "darkroom").iterdir() if (p / "__init__.py").exists()):
            rows = generator.module_summaries(package_dir, f"darkroom.{package_dir.name}")
            assert len(rows) == len(list(package_dir.rglob("*.py")))
            for name, summary in rows:
                assert summary.endswith("."), f"{name}: its docstring does not open with a whole sentence: {summary}"
    page = (ROOT / "docs" / "reference" / "modules.md").read_text()
    assert "darkroom.worker.inference.engine" in page  # subpackages included
    assert "reference/modules.md" in (ROOT / "mkdocs.yml").read_text()


def test_every_error_code_is_explained() -> None:
    assert set(ERROR_CODE_MEANINGS) == set(ErrorCode)


def test_readme_is_a_short_front_door() -> None:
    assert len(README.splitlines()) <= 250
    head = README[:1500]
    assert "make demo" in head and "make test" in head
    for section in ("## Using it", "## From Python", "## Architecture", "## Documentation"):
        assert section in README


def test_readme_links_point_at_files_that_exist() -> None:
    for target in re.findall(r"\]\(((?:docs/)[^)#]+)", README):
        assert (ROOT / target).exists(), target


def test_the_reliability_page_names_code_that_exists() -> None:
    """Each row of its "pieces, in the code" table names a file, and names in it, that are really there."""
    text = (ROOT / "docs" / "concepts" / "reliability.md").read_text()
    rows = re.findall(r"^\| [^|]+ \| `([\w/]+\.py)`(?: \(([^)]*)\))? \|$", text, flags=re.M)
    assert len(rows) >= 5, rows
    for path, names in rows:
        source = (ROOT / path).read_text()
        for name in re.findall(r"`(\w+)`", names):
            assert re.search(rf"\b(def|class) {name}\b|^{name} = ", source, flags=re.M), (path, name)


def test_site_builds_strictly(tmp_path: Path) -> None:
    mkdocs = Path(sys.executable).with_name("mkdocs")
    result = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_cli_page_does_not_depend_on_what_ran_before() -> None:
    """click caches a command's help option from the first context that asks; invoking a sub-command alone
    (as CLI tests do) must not change the generated page."""
    from click.testing import CliRunner

    from darkroom.dev.cli import services

    assert CliRunner().invoke(services, ["--help"]).exit_code == 0
    page, body = _generator().blocks()["cli"]
    assert body in (ROOT / "docs" / "reference" / page).read_text()
