"""The ``darkroom`` command host: one command, its sub-commands found by entry point.

Each distribution adds its own commands to the ``darkroom.commands`` entry-point group (the
producer: ``submit``, ``status``, ``wait``...; the worker: ``worker``, ``models``; the development
tools: ``services``, ``demo``), so no distribution imports another to extend the command line.
A group such as ``models`` can take sub-commands the same way from its own group
(``darkroom.commands.models``). Expected conditions (services not running, credentials refused, a
missing bucket) end a command with one line and an exit code (:mod:`.cli_errors`), never a traceback.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points
from typing import Any

import click

from .cli_errors import ExitCode, explain

__all__ = ["EntryPointGroup", "main"]

# Which distribution offers a command that is not installed here: named in the error.
_PROVIDERS = {
    "worker": "darkroom-worker", "models": "darkroom-worker",
    "submit": "darkroom-producer", "status": "darkroom-producer", "wait": "darkroom-producer",
    "services": "darkroom-dev", "demo": "darkroom-dev",
}


class EntryPointGroup(click.Group):
    """A group whose commands are entry points of ``entry_point_group`` (plus any added in code),
    loaded only when used or listed."""

    def __init__(self, *args: Any, entry_point_group: str = "darkroom.commands", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.entry_point_group = entry_point_group

    def list_commands(self, ctx: click.Context) -> list[str]:
        found = {ep.name for ep in entry_points(group=self.entry_point_group)}
        return sorted(found | set(self.commands))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.commands:
            return self.commands[name]
        for ep in entry_points(group=self.entry_point_group):
            if ep.name == name:
                command = ep.load()
                assert isinstance(command, click.Command)
                return command
        provider = _PROVIDERS.get(name) if self.entry_point_group == "darkroom.commands" else None
        if provider:
            raise click.UsageError(f"'darkroom {name}' needs the {provider} package: pip install {provider}")
        return None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(ExitCode.INTERRUPTED)
        except Exception as exc:
            failure = explain(exc)
            if failure is None:
                raise
            click.echo(f"darkroom: {failure.message}", err=True)
            sys.exit(failure.exit_code)


@click.group(cls=EntryPointGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    """Darkroom: distributed img2img (SDEdit) jobs on Redis, Celery workers and S3.

    Connection settings come from DARKROOM_* environment variables (DARKROOM_REDIS_URL,
    DARKROOM_S3_ENDPOINT_URL, DARKROOM_S3_ACCESS_KEY_ID, DARKROOM_S3_SECRET_ACCESS_KEY, ...);
    when none are set, from ./.darkroom/services.env (relative to the current directory, or
    DARKROOM_STATE_DIR), which 'darkroom services up' writes.

    \b
    Exit codes (every command): 0 ok; 1 failed or refused; 2 usage error;
    69 Redis or S3 unreachable (services not running?); 77 credentials refused;
    130 interrupted. 'wait' and 'submit --wait' add 2 cancelled; they and 'watch'
    add 3 timed out. Each command's --help lists its own.
    """
