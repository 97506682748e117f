"""``darkroom dispatcher`` (deliver webhooks) and ``darkroom webhooks ...`` (dead letters, secrets)."""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
import redis

from darkroom.common.clients import make_redis
from darkroom.common.errors import DarkroomError
from darkroom.common.logs import configure_logging
from darkroom.common.settings import Settings
from darkroom.common.webhooks import generate_secret

from .deliveries import DeadLetters, Delivery

__all__ = ["dispatcher", "webhooks"]


@click.command()
@click.option("--concurrency", type=click.IntRange(1, 256), default=None,
              help="Deliveries in flight at once [default: DARKROOM_WEBHOOK_CONCURRENCY or 8].")
@click.option("--name", default=None, help="This dispatcher's name [default: webhooks-<host>-<pid>].")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
def dispatcher(concurrency: int | None, name: str | None, log_level: str) -> None:
    """Deliver job webhooks (signed, retried, dead-lettered) until SIGTERM or Ctrl-C.

    Needs DARKROOM_WEBHOOK_SECRETS='{"<producer id>": "whsec_..."}'; run as many as you like.

    Exit codes: 0 stopped cleanly; 1 a setting is wrong; 69 Redis unreachable.
    """
    from darkroom.common.placeholders import check_secrets

    from .dispatcher import Dispatcher, DispatcherSettings

    overrides: dict[str, Any] = {"webhook_concurrency": concurrency, "dispatcher_name": name}
    try:
        settings = DispatcherSettings.load(**{k: v for k, v in overrides.items() if v is not None})
        check_secrets(settings, named=settings.webhook_secrets, named_setting="DARKROOM_WEBHOOK_SECRETS")
        runner = Dispatcher(settings, make_redis(settings))
        configure_logging(log_level, settings.log_format, runner.name)
    except DarkroomError as exc:
        raise click.ClickException(str(exc)) from None
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: runner.stop())
    schedule = ", ".join(f"{s:g}" for s in settings.webhook_retry_schedule)
    logging.getLogger("darkroom.webhooks").info(
        "dispatcher %s: producers %s, %d in flight, retries after [%s] s",
        runner.name, ", ".join(sorted(runner.secrets)), settings.webhook_concurrency, schedule,
    )
    try:
        runner.run()
    except redis.RedisError as exc:
        raise click.ClickException(f"Redis: {exc}; check DARKROOM_REDIS_URL") from None
    logging.getLogger("darkroom.webhooks").info("dispatcher %s stopped", runner.name)


@click.group()
def webhooks() -> None:
    """Inspect and replay failed webhooks; make signing secrets."""


@webhooks.command("list-failed")
@click.option("--json", "as_json", is_flag=True, help="Print every dead letter with its attempts as JSON.")
def list_failed(as_json: bool) -> None:
    """Show webhooks whose retry schedule ran out (the dead-letter store).

    Exit codes: 0 listed (also when there are none); 69 Redis unreachable.
    """
    with _dead_letters() as dead:
        entries = dead.entries()
        counts = dead.counts()
    if as_json:
        click.echo(json.dumps([json.loads(e.model_dump_json()) for e in entries], indent=2))
        return
    if not entries:
        click.echo("no failed webhooks")
    else:
        click.echo(_table(entries))
    click.echo(f"({counts['dead']} failed, {counts['retrying']} waiting for a retry, {counts['outbox']} in the outbox)")


@webhooks.command()
@click.argument("webhook_ids", nargs=-1)
@click.option("--all", "replay_all", is_flag=True, help="Replay every failed webhook.")
def replay(webhook_ids: tuple[str, ...], replay_all: bool) -> None:
    """Send failed webhooks again (same webhook-id, fresh retry schedule) through the dispatcher.

    Exit codes: 0 queued; 1 an id is not in the dead-letter store; 2 usage error; 69 Redis unreachable.
    """
    if bool(webhook_ids) == replay_all:
        raise click.UsageError("name webhook ids (see 'darkroom webhooks list-failed') or pass --all, not both")
    with _dead_letters() as dead:
        ids = [d.id for d in dead.entries()] if replay_all else list(webhook_ids)
        missing = [i for i in ids if not dead.replay(i)]
    queued = len(ids) - len(missing)
    click.echo(f"queued {queued} webhook(s) for redelivery; a running 'darkroom dispatcher' sends them")
    if missing:
        raise click.ClickException(f"not in the dead-letter store: {', '.join(missing)}")


@webhooks.command()
def secret() -> None:
    """Print a new signing secret (whsec_...) for DARKROOM_WEBHOOK_SECRETS and your receiver.

    Exit codes: 0 printed.
    """
    click.echo(generate_secret())


@contextmanager
def _dead_letters() -> Iterator[DeadLetters]:
    try:
        client = make_redis(Settings.load())
    except DarkroomError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        yield DeadLetters(client)
    except redis.RedisError as exc:
        raise click.ClickException(f"Redis: {exc}; check DARKROOM_REDIS_URL") from None
    finally:
        client.close()


def _table(entries: list[Delivery]) -> str:
    rows = [("WEBHOOK ID", "JOB", "EVENT", "URL", "TRIES", "LAST ERROR", "FAILED AT (UTC)")]
    for d in entries:
        last = d.attempts[-1].describe() if d.attempts else "-"
        dead_at = d.dead_at.strftime("%Y-%m-%d %H:%M:%S") if d.dead_at else "-"
        rows.append((d.id, d.job_id, d.event.type.value, d.url.split("?", 1)[0], str(len(d.attempts)),
                     _clip(last, 60), dead_at))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
