"""Regenerate the documentation's reference tables from the code (``make docs`` runs it first).

Each table sits between ``<!-- name:start -->`` and ``<!-- name:end -->`` in a page under
``docs/reference/``; ``--check`` exits 1, naming the stale blocks, instead of writing.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from darkroom.common.reference import error_codes_markdown, job_fields_markdown, metrics_markdown, settings_markdown
from darkroom.common.settings import Settings
from darkroom.producer.dashboard.settings import DashboardSettings
from darkroom.producer.webhooks.dispatcher import DispatcherSettings
from darkroom.worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "reference"
# The distributions, in the order the page lists them: folder of the pyproject.toml, then its package folder
DISTRIBUTIONS = ["common", "producer", "worker", "dev"]


def worker_metrics() -> list[tuple[str, str, list[str], str]]:
    """Every metric a worker exports: its own registry plus what its report collector yields."""
    from darkroom.worker.metrics import WorkerMetrics, _ReportCollector

    metrics = WorkerMetrics()
    rows = [(m._name, m._type, list(m._labelnames), m._documentation)
            for m in (metrics.jobs, metrics.stage_seconds, metrics.batch_size, metrics.in_progress,
                      metrics.lease_takeovers, metrics.deliveries)]

    class _NoRedis:
        def __getattr__(self, name: str) -> Any:
            raise ConnectionError("no Redis while generating docs")

    device = SimpleNamespace(free_memory=lambda: None, total_memory=0)
    from darkroom.worker.context import WorkerState

    ctx = SimpleNamespace(name="docs", state=WorkerState(), redis=_NoRedis(), device=device)
    for family in _ReportCollector(ctx).collect():  # type: ignore[arg-type]
        rows.append((family.name, family.type, list(getattr(family, "_labelnames", ())), family.documentation))
    return rows


def cli_markdown() -> str:
    """``darkroom --help`` and every command's (and sub-command's) ``--help``, as the terminal shows them."""
    import click

    from darkroom.common.cli import main

    sections = []

    def walk(command: click.Command, path: list[str], parent: click.Context | None) -> None:
        # the same context chain as a real invocation (so every command gets main's -h/--help), with the
        # parent's name left out of the usage line so each section reads as typed
        ctx = click.Context(command, info_name=" ".join(path), parent=None, max_content_width=100,
                            terminal_width=100, help_option_names=["-h", "--help"])
        if hasattr(command, "_help_option"):  # click caches the help option of the first context that asked
            command._help_option = None  # (a test that invoked the command alone): ask again with these names
        sections.append(f"### `{' '.join(path)}`\n\n```text\n{command.get_help(ctx)}\n```")
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                if sub is not None and not sub.hidden:
                    walk(sub, [*path, name], ctx)

    walk(main, ["darkroom"], None)
    return "\n\n".join(sections)


def module_summaries(package_dir: Path, package: str) -> list[tuple[str, str]]:
    """(dotted name, :func:`summary` of its docstring) for every module under ``package_dir``, subpackages included.

    Read with :mod:`ast`, so nothing is imported (no torch here). A module without a docstring stops the run.
    """
    rows = []
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir).with_suffix("").parts
        name = ".".join([package, *(parts[:-1] if parts[-1] == "__init__" else parts)])
        doc = ast.get_docstring(ast.parse(path.read_text(), str(path)))
        if not doc or not doc.strip():
            raise SystemExit(f"{path.relative_to(ROOT)} has no module docstring; its first line says what it holds")
        rows.append((name, summary(doc)))
    return sorted(rows)


def summary(doc: str) -> str:
    """The docstring's first line, or, where its first sentence runs on, that sentence joined into one line."""
    first = doc.strip().splitlines()[0].strip()
    if first.endswith("."):
        return first
    paragraph = " ".join(line.strip() for line in doc.strip().split("\n\n", 1)[0].splitlines())
    return re.split(r"(?<=\.)\s+(?=[A-Z`])", paragraph, maxsplit=1)[0]


def modules_markdown() -> str:
    """Every module of each distribution, one line each, under the distribution's name and role."""
    sections = []
    for folder in DISTRIBUTIONS:
        project = tomllib.loads((ROOT / folder / "pyproject.toml").read_text())["project"]
        package_dirs = sorted(p for p in (ROOT / folder / "darkroom").iterdir() if (p / "__init__.py").exists())
        rows = [row for d in package_dirs for row in module_summaries(d, f"darkroom.{d.name}")]
        table = "\n".join(f"| `{name}` | {_cell(summary)} |" for name, summary in rows)
        sections.append(f"## {project['name']}\n\n{project['description']}\n\n"
                        f"| module | what it holds |\n| --- | --- |\n{table}")
    return "\n\n".join(sections)


def _cell(text: str) -> str:
    """reStructuredText roles and literals read as Markdown code, and no stray table pipes."""
    text = re.sub(r":(?:mod|class|func|meth|data|attr):`~?([^`]+)`", r"`\1`", text)
    return text.replace("``", "`").replace("|", "\\|")


def blocks() -> dict[str, tuple[str, str]]:
    """Block name -> (page, generated markdown)."""
    return {
        "job-fields": ("job-fields.md", job_fields_markdown()),
        "settings": ("settings.md", settings_markdown()),
        "worker-settings": ("settings.md", settings_markdown(WorkerSettings, skip=Settings)),
        "dispatcher-settings": ("settings.md", settings_markdown(DispatcherSettings, skip=Settings)),
        "dashboard-settings": ("settings.md", settings_markdown(DashboardSettings, skip=Settings)),
        "error-codes": ("error-codes.md", error_codes_markdown()),
        "metrics": ("metrics.md", metrics_markdown(worker_metrics())),
        "cli": ("cli.md", cli_markdown()),
        "modules": ("modules.md", modules_markdown()),
    }


def replace_block(text: str, name: str, body: str) -> str:
    new, count = re.subn(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)",
                         lambda m: m.group(1) + body + "\n" + m.group(2), text, flags=re.S)
    if count != 1:
        raise SystemExit(f"docs/reference has no single {name} block")
    return new


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only report stale blocks (exit 1)")
    args = parser.parse_args()
    stale = []
    for name, (page, body) in blocks().items():
        path = DOCS / page
        text = path.read_text()
        new = replace_block(text, name, body)
        if new != text:
            stale.append(f"{page}: {name}")
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print("stale reference tables (run: make docs):", *stale, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
