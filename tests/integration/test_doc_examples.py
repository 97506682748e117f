"""Every code block marked runnable in the README and the documentation runs, as written.

A fenced block right after ``<!-- example: python -->`` runs as a script from the repository root
against the session's services and its worker (serving the tiny model as ``tiny``). A block after
``<!-- example: shell -->`` runs with bash from a fresh folder that holds only the venv and
``docs/images``, so it starts (and stops) services of its own, exactly as a newcomer would.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from darkroom.common.settings import Settings
from darkroom.dev.process import WorkerProcess

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
_BLOCK = re.compile(r"<!-- example: (python|shell) -->\n```(\w+)\n(.*?)```", re.S)


@dataclass(frozen=True)
class Example:
    path: Path
    line: int
    kind: str
    code: str

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def collect() -> list[Example]:
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = path.read_text()
        for match in _BLOCK.finditer(text):
            kind, fence, code = match.groups()
            assert (kind, fence) in {("python", "python"), ("shell", "sh")}, f"{path}: marker {kind} on ```{fence}"
            found.append(Example(path, text.count("\n", 0, match.start()) + 1, kind, code))
    return found


EXAMPLES = collect()


def test_the_readme_and_the_guides_have_runnable_examples() -> None:
    where = {str(e.path.relative_to(ROOT)) for e in EXAMPLES}
    assert {"README.md", "docs/getting-started.md", "docs/guides/sdk.md"} <= where


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("DARKROOM_")}


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.kind == "python"], ids=str)
def test_python_example_runs(example: Example, services: object, settings: Settings, worker: WorkerProcess) -> None:
    env = {**_clean_env(), **services.as_env(), "DARKROOM_STATE_DIR": str(settings.state_dir)}  # type: ignore[attr-defined]
    result = subprocess.run([sys.executable, "-c", example.code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{example} failed:\n{result.stderr[-4000:]}"
    assert "s3://" in result.stdout or "(64, 64)" in result.stdout or "[(" in result.stdout, result.stdout
    for word in ("failed:", "did not succeed", " cancelled"):
        assert word not in result.stdout, f"{example}: the job did not succeed:\n{result.stdout}"


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.kind == "shell"], ids=str)
def test_shell_example_runs_from_a_fresh_folder(example: Example, tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    shutil.copytree(ROOT / "docs" / "images", tmp_path / "docs" / "images")
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parents[1], target_is_directory=True)
    script = tmp_path / "example.sh"
    script.write_text(example.code)
    try:
        result = subprocess.run(["bash", "-e", "-o", "pipefail", str(script)], cwd=tmp_path, env=_clean_env(),
                                capture_output=True, text=True, timeout=300)
    finally:  # stop whatever the block left behind
        subprocess.run([str(Path(sys.executable).with_name("darkroom")), "services", "down"], cwd=tmp_path,
                       env=_clean_env(), capture_output=True, timeout=60)
    assert result.returncode == 0, f"{example} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    assert list((tmp_path / "outputs").glob("*.png")), result.stdout
