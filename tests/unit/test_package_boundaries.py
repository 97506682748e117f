"""The distributions' boundaries: who may import whom, what each one declares, and one error tree.

worker → common only; producer → common only; common → neither; dev (never on a fleet) → any.
Checked three ways: the installed metadata, every ``import`` statement in the sources, and real
imports of every module in a fresh interpreter where the forbidden packages cannot be found.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# package -> (source folder, darkroom packages it must never import)
PACKAGES = {
    "common": (ROOT / "common" / "darkroom" / "common", {"producer", "worker", "dev"}),
    "producer": (ROOT / "producer" / "darkroom" / "producer", {"worker", "dev"}),
    "worker": (ROOT / "worker" / "darkroom" / "worker", {"producer", "dev"}),
}


def _darkroom_imports(path: Path) -> set[str]:
    """The darkroom sub-packages (``common``, ``producer``...) one source file imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found |= {n.split(".")[1] for n in names if n.startswith("darkroom.") and n.count(".") >= 1}
    return found


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_sources_import_only_what_their_distribution_may(package: str) -> None:
    folder, forbidden = PACKAGES[package]
    crossings = {str(p.relative_to(ROOT)): sorted(_darkroom_imports(p) & forbidden) for p in folder.rglob("*.py")}
    assert {path: bad for path, bad in crossings.items() if bad} == {}


def test_the_check_sees_a_crossing(tmp_path: Path) -> None:
    sample = tmp_path / "x.py"
    sample.write_text("from darkroom.producer.client import Client\nimport darkroom.dev.tiny\n")
    assert _darkroom_imports(sample) == {"producer", "dev"}


@pytest.mark.parametrize(("distribution", "forbidden"), [
    ("darkroom-common", {"darkroom-producer", "darkroom-worker", "darkroom-dev"}),
    ("darkroom-producer", {"darkroom-worker", "darkroom-dev", "torch"}),
    ("darkroom-worker", {"darkroom-producer", "darkroom-dev"}),
])
def test_installed_metadata_declares_no_forbidden_dependency(distribution: str, forbidden: set[str]) -> None:
    declared = {r.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower()
                for r in requires(distribution) or []}
    assert declared & forbidden == set()
    if distribution != "darkroom-common":
        assert "darkroom-common" in declared


_BLOCKED_IMPORTS = """
import importlib, importlib.abc, pkgutil, sys
BLOCKED = {blocked!r}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"{{name}} blocked by the test")
        return None
sys.meta_path.insert(0, Blocker())
import darkroom.{package} as pkg
names = [m.name for m in pkgutil.walk_packages(pkg.__path__, "darkroom.{package}.") if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
print(len(names))
"""


@pytest.mark.parametrize(("package", "blocked"), [
    ("worker", ["darkroom.producer", "darkroom.dev"]),
    ("producer", ["darkroom.worker", "darkroom.dev", "torch", "diffusers"]),
    ("common", ["darkroom.producer", "darkroom.worker", "darkroom.dev", "torch"]),
])
def test_every_module_imports_with_the_other_packages_absent(package: str, blocked: list[str]) -> None:
    script = _BLOCKED_IMPORTS.format(blocked=blocked, package=package)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.strip()) > 3


def _all_modules() -> list[str]:
    names = []
    for package in ("common", "producer", "worker", "dev"):
        pkg = importlib.import_module(f"darkroom.{package}")
        names.append(pkg.__name__)
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, f"darkroom.{package}.")
                  if not m.name.endswith("__main__")]
    return names


def test_every_exception_derives_from_the_one_root() -> None:
    from darkroom.common.errors import DarkroomError

    outside = []
    for name in _all_modules():
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == name and issubclass(cls, BaseException) and not issubclass(cls, DarkroomError):
                outside.append(f"{name}.{cls.__qualname__}")
    assert outside == []


def test_callers_keep_their_familiar_second_bases() -> None:
    from darkroom.common.jobstore import JobNotFound
    from darkroom.common.status import IllegalTransition
    from darkroom.common.storage import InvalidUri

    assert issubclass(JobNotFound, KeyError) and issubclass(IllegalTransition, ValueError)
    assert issubclass(InvalidUri, ValueError)


def _key_literals(path: Path) -> list[str]:
    """String constants that look like Redis key names (``darkroom:...``, no spaces) in one source file."""
    return [node.value for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and node.value.startswith("darkroom:") and not any(c.isspace() for c in node.value)]


def test_redis_key_names_live_in_common() -> None:
    found = {str(p.relative_to(ROOT)): _key_literals(p)
             for package in ("producer", "worker") for p in PACKAGES[package][0].rglob("*.py")}
    assert {path: keys for path, keys in found.items() if keys} == {}


def test_the_key_check_sees_a_key(tmp_path: Path) -> None:
    sample = tmp_path / "x.py"
    sample.write_text('"""Reads darkroom:jobs:open (prose is fine)."""\nKEY = "darkroom:x"\nf = f"darkroom:y:{id}"\n')
    assert _key_literals(sample) == ["darkroom:x", "darkroom:y:"]
