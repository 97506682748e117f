"""Regenerate the documentation's reference tables from the code (``make docs`` runs it first).

Each table sits between ``<!-- name:start -->`` and ``<!-- name:end -->`` in a page under
``docs/reference/``; ``--check`` exits 1, naming the stale blocks, instead of writing.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from darkroom.common.reference import error_codes_markdown, job_fields_markdown, metrics_markdown, settings_markdown
from darkroom.common.settings import Settings
from darkroom.producer.dashboard.settings import DashboardSettings
from darkroom.producer.webhooks.dispatcher import DispatcherSettings
from darkroom.worker.settings import WorkerSettings

DOCS = Path(__file__).resolve().parents[1] / "docs" / "reference"


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
        sections.append(f"### `{' '.join(path)}`\n\n```text\n{command.get_help(ctx)}\n```")
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                sub = command.get_command(ctx, name)
                if sub is not None and not sub.hidden:
                    walk(sub, [*path, name], ctx)

    walk(main, ["darkroom"], None)
    return "\n\n".join(sections)


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
