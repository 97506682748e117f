"""Commands of the development tools: ``services``, ``demo`` and ``models make-tiny``.

``services`` runs the embedded Redis + S3 server. Found by the ``darkroom`` host through entry points (see :mod:`darkroom.common.cli`)."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from darkroom.common.settings import Settings


def _quiet_libraries() -> None:
    from darkroom.worker.libs import quiet_libraries

    quiet_libraries()


@click.group()
def services() -> None:
    """Start, stop or inspect the embedded Redis and S3 server (for laptops, demos and tests)."""


@services.command("up")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None, help="Default: DARKROOM_STATE_DIR or .darkroom")
@click.option("--quiet", "-q", is_flag=True, help="Print one line instead of the settings.")
@click.option("--ha", is_flag=True, help="Also a Redis replica and three Sentinels (clients follow failovers); "
                                         "the state folder stays HA.")
def services_up(state_dir: Path | None, quiet: bool, ha: bool) -> None:
    """Start a private Redis and a SeaweedFS S3 server on 127.0.0.1; print the settings to use.

    The settings go to <state dir>/services.env, where every darkroom command run from this
    folder finds them (from elsewhere, export them: set -a; . <file>; set +a). With --ha a replica
    and three Sentinels run too, from the same redis-server.

    Exit codes: 0 running; 1 a server could not start (its log is named).
    """
    from .embedded import EmbeddedServicesError

    embedded = _embedded(state_dir, ha=ha)
    try:
        endpoints = embedded.up()
    except EmbeddedServicesError as exc:
        raise click.ClickException(str(exc).splitlines()[0]) from None
    if quiet:
        click.echo(f"embedded services are up; settings in {embedded.env_file}")
        return
    click.echo(f"# embedded services are up; settings written to {embedded.env_file}")
    click.echo(f"# use them from a shell with: set -a; . {embedded.env_file}; set +a")
    for key, value in endpoints.redacted().items():
        click.echo(f"{key}={value}")


@services.command("down")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None)
@click.option("--stop-workers", is_flag=True,
              help="Also send SIGTERM to workers on this host attached to these services.")
def services_down(state_dir: Path | None, stop_workers: bool) -> None:
    """Stop the embedded services (data stays under the state folder).

    Workers still attached to them would retry connecting forever: they are named (and, with
    --stop-workers, stopped first when they run on this host).

    Exit codes: 0 stopped (or were not running).
    """
    embedded = _embedded(state_dir)
    attached = _attached_workers(embedded)
    if attached and stop_workers:
        _stop_local_workers(attached)
    elif attached:
        names = ", ".join(w.name for w in attached)
        click.echo(f"warning: {len(attached)} worker(s) still attached to these services: {names}; they will "
                   "keep retrying until stopped (Ctrl-C or kill them, or use --stop-workers)", err=True)
    embedded.down()
    click.echo("embedded services stopped")


def _attached_workers(embedded: Any) -> list[Any]:
    """Live workers reporting to the embedded Redis; [] when it is not running."""
    from darkroom.common.fleet import Fleet

    endpoints = embedded.endpoints()
    if endpoints is None or not embedded.status()["redis"]["running"]:
        return []
    import redis

    try:
        client = redis.Redis.from_url(endpoints.redis_url, socket_connect_timeout=2)
        return list(Fleet(client).workers(fresh=True))
    except redis.exceptions.RedisError:
        return []


def _stop_local_workers(workers: list[Any]) -> None:
    import os
    import signal
    import socket

    for w in workers:
        pid, host = w.data.get("pid"), w.data.get("host")
        here = host == socket.gethostname() or (host is None and socket.gethostname() in w.name)
        if isinstance(pid, int) and here:
            try:
                os.kill(pid, signal.SIGTERM)
                click.echo(f"stopping worker {w.name} (pid {pid})")
            except ProcessLookupError:
                pass
        else:
            click.echo(f"warning: worker {w.name} runs elsewhere; stop it there", err=True)
    deadline = time.monotonic() + 30
    for w in workers:
        pid = w.data.get("pid")
        while isinstance(pid, int) and time.monotonic() < deadline and _pid_alive(pid):
            time.sleep(0.2)


def _pid_alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@services.command("status")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None)
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def services_status(state_dir: Path | None, as_json: bool) -> None:
    """Show whether the embedded services are running.

    Exit codes: 0 both running; 1 one or both stopped (or never started).
    """
    embedded = _embedded(state_dir)
    status = embedded.status()
    if as_json:
        click.echo(json.dumps(status, indent=2, default=str))
    else:
        click.echo(f"embedded services in {Path(embedded.state_dir).absolute()}:")
        labels = {"redis": "Redis", "s3": "S3 server"}
        for name, info in status.items():
            label = labels.get(name, name)
            if info["running"]:
                click.echo(f"  {label:<13} running  {info['url']}  (pid {info['pid']})")
            else:
                click.echo(f"  {label:<13} stopped")
        if hasattr(embedded, "topology"):  # --ha: who is primary now, as the Sentinels say
            topology = embedded.topology()
            click.echo(f"  primary       {topology['primary'] or 'unknown (no Sentinel answers)'}  "
                       f"(master name {topology['master_name']!r}; "
                       + ", ".join(f"{node} {role}" for node, role in topology["nodes"].items()) + ")")
        if not all(info["running"] for info in status.values()):
            click.echo("start them with: darkroom services up")
    sys.exit(0 if all(info["running"] for info in status.values()) else 1)


def _embedded(state_dir: Path | None, *, ha: bool = False) -> Any:
    from .embedded_ha import services_for

    return services_for(state_dir or Settings.load().state_dir, ha=ha)



@click.command("make-tiny")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
@click.option("--overwrite", is_flag=True, help="Replace an existing model in DIRECTORY.")
@click.option("--family", type=click.Choice(["sd", "sd2-v", "sdxl", "sdxl-refiner", "sd3", "flux"]), default="sd",
              show_default=True, help="The model family's architecture (sd2-v: SD 2.x with v-prediction).")
def make_tiny(directory: Path, seed: int, overwrite: bool, family: str) -> None:
    """Write a tiny model of a family's architecture with RANDOM weights to DIRECTORY.

    Built offline from configs (no hub), tokenizers included (CLIP; T5 for sd3 and flux). Its
    outputs are noise-like: it exists to exercise the whole system fast. Point --model at a real
    diffusers folder for real images.

    Exit codes: 0 written (or already there); 1 DIRECTORY holds something else (see --overwrite).
    """
    _quiet_libraries()
    from .tiny import make_tiny_model

    try:
        path = make_tiny_model(directory, seed=seed, overwrite=overwrite, family=family)
    except FileExistsError as exc:
        raise click.ClickException(f"{exc}: choose another folder, or replace it with --overwrite") from None
    click.echo(str(path))



@click.command()
@click.option("--state-dir", type=click.Path(path_type=Path), default=None,
              help="Where services, the tiny model and the contact sheet live (default .darkroom).")
@click.option("--model-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Use this diffusers model folder instead of the tiny trained demo model.")
@click.option("--strengths", default="0.3,0.5,0.7,0.9", show_default=True, help="Comma-separated strengths.")
@click.option("--prompt", default=None,
              help="Default: 'red' for the demo model (it knows colour words), a lighthouse painting with --model-dir.")
@click.option("--families/--no-families", default=True, show_default=True,
              help="Also serve a tiny SDXL model (random weights) from the same worker and run one SDXL job.")
def demo(state_dir: Path | None, model_dir: Path | None, strengths: str, prompt: str | None, families: bool) -> None:
    """Run the whole path once: services, model, worker, jobs at several strengths, contact sheet.

    By default the worker also serves a tiny SDXL model (random weights: noise, not quality) and runs one
    SDXL job, shown last on the contact sheet.

    Exit codes: 0 every job succeeded; 1 something failed (the reason is printed); 130 interrupted.
    """
    _quiet_libraries()
    from .demo import run_demo

    values = [float(s) for s in strengths.split(",") if s.strip()]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(run_demo(state_dir=state_dir, model_dir=model_dir, strengths=values, prompt=prompt, families=families))
