"""``darkroom producers add|list|rotate|remove|policy|acl``: the producer registry (identity and policy)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import click
import redis

from darkroom.common.clients import make_redis
from darkroom.common.jobs import Priority
from darkroom.common.producers import Producer, ProducerPolicy, ProducerRegistry, UnknownProducer, acl_lines
from darkroom.common.settings import Settings

__all__ = ["producers"]


@contextmanager
def _registry() -> Iterator[ProducerRegistry]:
    client = make_redis(Settings.load())
    try:
        yield ProducerRegistry(client)
    except redis.RedisError as exc:
        raise click.ClickException(f"Redis: {exc}") from None
    except UnknownProducer as exc:
        raise click.ClickException(f"no producer {exc.args[0]!r}; see: darkroom producers list") from None
    finally:
        client.close()


def _policy_options(command: Any) -> Any:
    options = [
        click.option("--read-prefix", "read_prefixes", multiple=True,
                     help="s3://bucket[/prefix] its jobs may read (repeat; none: any)."),
        click.option("--write-prefix", "write_prefixes", multiple=True,
                     help="s3://bucket[/prefix] its jobs may write outputs under (repeat; none: any)."),
        click.option("--model", "models", multiple=True, help="Model id it may use (repeat; none: any)."),
        click.option("--adapter", "adapters", multiple=True, help="Registry adapter id it may use (repeat; none: any)."),
        click.option("--max-priority", type=click.Choice([p.value for p in Priority]), default="interactive",
                     show_default=True, help="bulk: its interactive jobs are refused."),
        click.option("--max-job-cost", type=click.IntRange(1), default=None,
                     help="Highest images x pixels x steps of one job."),
        click.option("--max-in-flight", type=click.IntRange(1), default=None, help="Queued plus running jobs at once."),
        click.option("--max-per-minute", type=click.IntRange(1), default=None, help="Submissions per minute."),
        click.option("--weight", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
                     help="Fair-share weight of its bulk work."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _policy(fields: dict[str, Any]) -> ProducerPolicy:
    return ProducerPolicy.model_validate({k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()})


def _env_lines(producer_id: str, key_id: str, secret: str) -> str:
    return f"DARKROOM_PRODUCER_ID={producer_id}\nDARKROOM_PRODUCER_KEY_ID={key_id}\nDARKROOM_PRODUCER_KEY={secret}"


@click.group()
def producers() -> None:
    """Register producers: each gets an id and a signing key; workers then refuse unsigned jobs.

    Once any producer is registered, every job must be signed by a registered producer (set
    DARKROOM_PRODUCER_ID, DARKROOM_PRODUCER_KEY_ID and DARKROOM_PRODUCER_KEY where it submits).
    """


@producers.command("add")
@click.argument("producer_id")
@_policy_options
def add(producer_id: str, weight: float, **fields: Any) -> None:
    """Register PRODUCER_ID and print its signing key (shown once) as environment lines."""
    try:
        policy = _policy(fields)
        Producer(id=producer_id)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    with _registry() as registry:
        try:
            producer, secret = registry.add(producer_id, policy, weight)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(_env_lines(producer.id, producer.keys[0].key_id, secret))


@producers.command("policy")
@click.argument("producer_id")
@_policy_options
def policy(producer_id: str, weight: float, **fields: Any) -> None:
    """Replace PRODUCER_ID's policy (every limit not given is lifted)."""
    with _registry() as registry:
        registry.set_policy(producer_id, _policy(fields), weight)
    click.echo(f"policy of {producer_id} replaced")


@producers.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per producer (keys never shown).")
def list_(as_json: bool) -> None:
    """Registered producers, their key ids (with expiry) and policies; never the keys."""
    with _registry() as registry:
        found = registry.all()
    for p in found:
        keys: list[dict[str, Any]] = [{"key_id": k.key_id, "expires_at": k.expires_at} for k in p.keys]
        if as_json:
            click.echo(json.dumps({"id": p.id, "keys": keys, "weight": p.weight,
                                   "policy": p.policy.model_dump(mode="json", exclude_defaults=True)}))
            continue
        described = ", ".join(k.key_id + ("" if k.expires_at is None else f" (until {_when(k.expires_at)})")
                              for k in p.keys)
        limits = p.policy.model_dump(mode="json", exclude_defaults=True)
        click.echo(f"{p.id}  keys: {described}  weight {p.weight:g}  policy: {json.dumps(limits) if limits else 'any'}")
    if not found and not as_json:
        click.echo("no producers registered: workers accept unsigned jobs (one-producer mode)")


@producers.command("rotate")
@click.argument("producer_id")
@click.option("--overlap", type=click.FloatRange(0), default=3600.0, show_default=True,
              help="Seconds the current keys stay valid beside the new one.")
def rotate(producer_id: str, overlap: float) -> None:
    """Give PRODUCER_ID a new key; the old ones keep working for --overlap seconds."""
    with _registry() as registry:
        producer, key = registry.rotate(producer_id, overlap)
    click.echo(_env_lines(producer.id, key.key_id, key.secret))


@producers.command("remove")
@click.argument("producer_id")
def remove(producer_id: str) -> None:
    """Unregister PRODUCER_ID: its jobs not yet started are refused from now on."""
    with _registry() as registry:
        if not registry.remove(producer_id):
            raise click.ClickException(f"no producer {producer_id!r}")
    click.echo(f"removed {producer_id}")


@producers.command("acl")
@click.argument("producer_id")
@click.option("--password", default=None, help="The Redis user's password [default: a new random one].")
@click.option("--file-format", is_flag=True, help="Print ACL file lines (`user ...`) instead of commands: append "
                                                  "them to infra/redis/producers.acl (compose, k8s).")
def acl(producer_id: str, password: str | None, file_format: bool) -> None:
    """Print Redis ACL SETUSER lines for a user that submits as PRODUCER_ID and cannot read the registry."""
    with _registry() as registry:
        registry.require(producer_id)
    secret = password or secrets.token_urlsafe(24)
    for line in acl_lines(producer_id, secret):
        click.echo(line.replace("ACL SETUSER ", "user ", 1) if file_format else line)


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
