"""The ``darkroom`` command line.

Sub-commands come from the ``darkroom.commands`` entry-point group, so the
producer package offers ``submit``, ``status``, ``wait``, ``upload``, ``download`` and
``services`` and the worker package, when installed, adds ``worker``, ``models`` and
``demo`` without the producer importing it. Expected conditions (services not running,
credentials refused, a missing bucket) end a command with one line and an exit code
(:mod:`.cli_errors`), never a traceback.
"""

from __future__ import annotations

import json
import sys
import time
from enum import Enum
from importlib.metadata import entry_points
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

import click

from darkroom.common.errors import DarkroomError, InvalidJobError, JobCancelled, JobFailed, NotPermitted, WaitTimeout
from darkroom.common.events import EventType, JobEvent
from darkroom.common.jobs import Img2ImgJob, allowed_range
from darkroom.common.jobstore import JobNotFound, JobRecord
from darkroom.common.settings import Settings

from .cli_errors import ExitCode, explain, no_worker_notice, settings_source

_WORKER_COMMANDS = {"worker", "models", "demo"}


class _Commands(click.Group):
    """A group whose commands are entry points, loaded only when used or listed."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({ep.name for ep in entry_points(group="darkroom.commands")})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        for ep in entry_points(group="darkroom.commands"):
            if ep.name == name:
                command = ep.load()
                assert isinstance(command, click.Command)
                return command
        if name in _WORKER_COMMANDS:
            raise click.UsageError(f"'darkroom {name}' needs the worker package: pip install darkroom-worker")
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


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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


# -- submit ---------------------------------------------------------------
def _scalar_type(annotation: Any) -> Any:
    """The flag type of a field: unwrap Annotated and Optional, take a union's first member (str for
    "one text or a list"); a list or model stays what it is (it has no flag)."""
    for _ in range(8):
        if hasattr(annotation, "__metadata__"):  # Annotated[T, ...]
            annotation = annotation.__origin__
        elif get_origin(annotation) in (Union, UnionType):
            annotation = next(a for a in get_args(annotation) if a is not type(None))
        else:
            break
    return get_origin(annotation) or annotation


def _job_options(command: Any) -> Any:
    """Add one --option per scalar Img2ImgJob field, with its description, default and range."""
    for name, info in reversed(list(Img2ImgJob.model_fields.items())):
        base = _scalar_type(info.annotation)
        if isinstance(base, type) and issubclass(base, Enum):
            click_type: Any = click.Choice([m.value for m in base])
        elif base in (int, float, str, bool):
            click_type = base
        else:
            continue
        help_text = info.description or ""
        allowed = allowed_range(Img2ImgJob, name)
        if allowed:
            help_text += f" [{allowed}]"
        if not info.is_required() and info.default is not None:
            default = info.default.value if isinstance(info.default, Enum) else info.default
            help_text += f" [default: {default}]"
        flag = "--" + name.replace("_", "-")
        if base is bool:  # --precheck-input / --no-precheck-input
            flag += "/--no-" + name.replace("_", "-")
        command = click.option(flag, name, type=click_type, default=None, help=help_text)(command)
    return command


@main.command()
@_job_options
@click.option("--wait", "wait_", is_flag=True, help="Wait for the job and print its output URIs.")
@click.option("--timeout", type=float, default=None, help="With --wait: give up after this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--quiet", "-q", is_flag=True,
              help="Print only the job id (the default when stdout is not a terminal, e.g. JOB=$(darkroom submit ...)).")
@click.option("--job", "job_file", type=click.File("r"), default=None,
              help="A JSON file (or - for stdin) with job fields, e.g. adapters, timesteps or per-image seeds; "
                   "flags override it.")
def submit(wait_: bool, timeout: float | None, as_json: bool, quiet: bool, job_file: Any, **fields: Any) -> None:
    """Submit one img2img job; print its id (and, with --wait, its outputs).

    On a terminal it prints 'submitted <id>'; with --quiet, or when stdout is a pipe or a file,
    only the id.

    \b
    Example:
      JOB=$(darkroom submit --model tiny --image s3://darkroom/inputs/cat.png --prompt "a cat")

    \b
    Exit codes: 0 submitted (with --wait: succeeded); 1 refused (a bad field) or, with --wait,
    the job failed; 2 usage error or, with --wait, cancelled; 3 --timeout passed; 69 Redis or S3
    unreachable (services not running?); 77 credentials refused.
    """
    from .client import Client

    job = json.load(job_file) if job_file is not None else {}
    if not isinstance(job, dict):
        raise click.BadParameter("the --job file must hold one JSON object of job fields", param_hint="--job")
    job.update({k: v for k, v in fields.items() if v is not None})
    with _client(Client) as client:
        try:
            handle = client.submit(job)
        except InvalidJobError as exc:  # one line: every bad field, each value cut to 80 characters
            raise click.ClickException("job refused: " + "; ".join(str(e) for e in exc.errors)) from None
        except NotPermitted as exc:  # another producer's job, or a quota (quota_exceeded says when to retry)
            raise click.ClickException(str(exc)) from None
        if as_json:
            pass
        elif quiet or not sys.stdout.isatty():
            click.echo(handle.job_id)
        else:
            click.echo(f"submitted {handle.job_id}")
        if wait_:
            _wait_and_print(client, handle.job_id, timeout, as_json)
        elif as_json:
            click.echo(json.dumps({"job_id": handle.job_id}))


# -- status / wait ----------------------------------------------------------
@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print the whole record as JSON.")
def status(job_id: str, as_json: bool) -> None:
    """Show a job's status (and its outputs or error).

    Exit codes: 0 shown; 1 no such job; 69 Redis unreachable (services not running?).
    """
    from .client import Client

    with _client(Client) as client:
        try:
            record = client.status(job_id)
        except JobNotFound:
            raise click.ClickException(f"no job {job_id!r} (never submitted, or its status expired)") from None
        except NotPermitted as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(record.model_dump_json(indent=2) if as_json else _describe(record))


@main.command()
@click.argument("job_id")
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds (exit code 3).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def wait(job_id: str, timeout: float | None, as_json: bool) -> None:
    """Wait for a job to finish, with a progress bar; print its output URIs.

    \b
    Exit codes: 0 succeeded; 1 failed (its error code and message on stderr) or no such job;
    2 cancelled; 3 --timeout passed; 69 Redis unreachable (services not running?).
    A queued job whose model no live worker serves gets a one-line note on stderr (how to start
    one); wait keeps waiting, since a worker may still start.
    """
    from .client import Client

    with _client(Client) as client:
        _wait_and_print(client, job_id, timeout, as_json)


@main.command()
@click.argument("job_ids", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print {job id: status after the request} as JSON.")
def cancel(job_ids: tuple[str, ...], as_json: bool) -> None:
    """Cancel jobs: queued ones never run; running ones stop at their next denoising step.

    Exit codes: 0 done (cancelled, or already ended); 1 no such job; 69 Redis unreachable.
    """
    from .client import Client

    statuses = {}
    with _client(Client) as client:
        for job_id in job_ids:
            try:
                record = client.cancel(job_id)
            except JobNotFound:
                raise click.ClickException(f"no job {job_id!r} (never submitted, or its status expired)") from None
            except NotPermitted as exc:
                raise click.ClickException(str(exc)) from None
            statuses[job_id] = record.status.value
            if not as_json:
                state = "cancelled" if record.status.value == "cancelled" else f"already {record.status.value}"
                click.echo(f"{job_id}: {state}")
    if as_json:
        click.echo(json.dumps(statuses))


@main.command()
@click.argument("job_ids", nargs=-1, required=True)
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds (exit code 3).")
@click.option("--json", "as_json", is_flag=True, help="Print each event as one line of JSON.")
def watch(job_ids: tuple[str, ...], timeout: float | None, as_json: bool) -> None:
    """Follow jobs: one line per event (their state now, then each change) until all have ended.

    \b
    Exit codes: 0 every job succeeded; 1 one failed or was cancelled, or no such job;
    3 --timeout passed; 69 Redis unreachable (services not running?).
    """
    from .client import Client

    ended_badly = False
    with _client(Client) as client:
        try:
            for event in client.watch(job_ids, timeout=timeout):
                click.echo(event.model_dump_json() if as_json else _event_line(event))
                ended_badly |= event.type in (EventType.FAILED, EventType.CANCELLED)
        except JobNotFound as exc:
            raise click.ClickException(f"no job {exc.args[0]!r} (never submitted, or its status expired)") from None
        except WaitTimeout as exc:
            click.echo(f"timed out: {exc.message}", err=True)
            sys.exit(3)
    sys.exit(1 if ended_badly else 0)


def _event_line(event: JobEvent) -> str:
    """``14:02:07.318  <job id>  progress   step 3/10`` (local time)."""
    when = event.time.astimezone().strftime("%H:%M:%S.%f")[:-3]
    if event.type is EventType.PROGRESS:
        detail = f"step {event.step}/{event.total_steps}"
    elif event.error_code or event.error_message:
        detail = f"[{event.error_code or '-'}] {event.error_message or ''}".rstrip()
    elif event.worker:
        detail = f"attempt {event.attempt} on {event.worker}"
    else:
        detail = ""
    return f"{when}  {event.job_id}  {event.type.value:<9}  {detail}".rstrip()


def _wait_and_print(client: Any, job_id: str, timeout: float | None, as_json: bool) -> None:
    if (notice := no_worker_notice(client, job_id)) is not None:  # else a first-time user waits on nothing
        click.echo(f"darkroom: {notice}", err=True)
    bar = _ProgressLine(enabled=not as_json and sys.stderr.isatty())
    try:
        result = client.wait(job_id, timeout=timeout, on_event=bar.update)
    except NotPermitted as exc:
        bar.close()
        raise click.ClickException(str(exc)) from None
    except JobFailed as exc:
        bar.close()
        click.echo(f"failed [{exc.code}]: {exc.message}", err=True)
        sys.exit(1)
    except JobCancelled:
        bar.close()
        click.echo("cancelled", err=True)
        sys.exit(2)
    except WaitTimeout as exc:
        bar.close()
        click.echo(f"timed out: {exc.message}", err=True)
        sys.exit(3)
    bar.close()
    if as_json:
        click.echo(result.model_dump_json(indent=2))
        return
    click.echo(f"succeeded in {result.timings.total:.2f} s on {result.worker} ({result.device})")
    for output in result.outputs:
        where = output.uri or f"(blocked; original in {output.quarantine_uri})"
        safety = f"  safety={output.safety.action.value}" if output.safety and output.safety.flagged else ""
        click.echo(f"  {where}  seed={output.seed}{safety}")
    click.echo(f"  {result.result_uri}")


class _ProgressLine:
    """A one-line progress bar on stderr fed by job events."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.started = time.monotonic()
        self.dirty = False

    def update(self, event: JobEvent) -> None:
        if not self.enabled:
            return
        if event.type is EventType.PROGRESS and event.step and event.total_steps:
            done = int(30 * event.step / event.total_steps)
            line = f"[{'#' * done}{'.' * (30 - done)}] step {event.step}/{event.total_steps}"
        else:
            line = event.type.value
        elapsed = time.monotonic() - self.started
        click.echo(f"\r{line}  {elapsed:5.1f}s\x1b[K", nl=False, err=True)
        self.dirty = True

    def close(self) -> None:
        if self.dirty:
            click.echo("", err=True)
            self.dirty = False


def _describe(record: JobRecord) -> str:
    lines = [f"{record.job_id}: {record.status.value} (attempt {record.attempt}, worker {record.worker or '-'})"]
    if record.error_code:
        lines.append(f"  error [{record.error_code}]: {record.error_message}")
    if record.result:
        lines.extend(f"  {uri}" for uri in record.result.uris)
    return "\n".join(lines)


# -- upload / download --------------------------------------------------------
@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("destination", metavar="s3://BUCKET/PREFIX/")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of the uploaded URIs.")
def upload(files: tuple[Path, ...], destination: str, as_json: bool) -> None:
    """Upload local files to object storage; print each one's s3:// URI.

    A DESTINATION ending in '/' (or several FILES) keeps each file's name under it;
    one file and a DESTINATION without the '/' is that exact object.

    \b
    Example:
      darkroom upload photos/*.png s3://darkroom/inputs/

    \b
    Exit codes: 0 uploaded; 1 refused (bucket missing, bad URI); 2 usage error; 69 S3 server
    unreachable (services not running?); 77 no S3 credentials found, or credentials refused.
    """
    from .client import Client

    target = _parse_uri(destination, "DESTINATION")
    as_prefix = destination.endswith("/") or len(files) > 1 or not target.key
    uris = []
    with _client(Client) as client:
        for path in files:
            uri = target.join(path.name) if as_prefix else target
            uris.append(client.upload(path, str(uri)))  # a missing bucket, no credentials: one line (cli_errors)
            if not as_json:
                click.echo(str(uri))
    if as_json:
        click.echo(json.dumps(uris))


@main.command()
@click.argument("sources", nargs=-1, required=True, metavar="JOB_ID|s3://URI...")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of the files written.")
def download(sources: tuple[str, ...], directory: Path, as_json: bool) -> None:
    """Download a job's outputs, an object or every object under a prefix into DIRECTORY.

    A SOURCE is a job id (its output images; the job must have succeeded), an s3:// object,
    or an s3:// prefix ending in '/'. Prints each file written.

    \b
    Example:
      darkroom download "$JOB" outputs/

    \b
    Exit codes: 0 downloaded; 1 no such job, job not succeeded, or object missing; 2 usage error;
    69 Redis or S3 unreachable (services not running?); 77 credentials refused.
    """
    from darkroom.common.errors import ObjectNotFoundError

    from .client import Client

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    with _client(Client) as client:
        for source in sources:
            for uri in _download_uris(client, source):
                path = directory / uri.rsplit("/", 1)[-1]
                if not source.startswith("s3://"):  # a job's outputs are 000.png, 001.png ...: keep jobs apart
                    path = directory / f"{source}-{path.name}"
                try:
                    path.write_bytes(client.download(uri))
                except ObjectNotFoundError:
                    raise click.ClickException(f"{uri} does not exist") from None
                written.append(str(path))
                if not as_json:
                    click.echo(str(path))
    if as_json:
        click.echo(json.dumps(written))


def _download_uris(client: Any, source: str) -> list[str]:
    if source.startswith("s3://"):
        uri = _parse_uri(source, "SOURCE")
        if not source.endswith("/") and uri.key:
            return [str(uri)]
        from darkroom.common.errors import ObjectNotFoundError

        try:
            found = [str(o.uri) for o in client.store.list_objects(uri)]
        except ObjectNotFoundError:  # a listing finds no bucket, never no object
            raise click.ClickException(f"bucket {uri.bucket!r} does not exist") from None
        if not found:
            raise click.ClickException(f"nothing under {source}")
        return found
    try:
        record = client.status(source)
    except JobNotFound:
        raise click.ClickException(f"no job {source!r} (never submitted, or its status expired)") from None
    if record.result is None:
        raise click.ClickException(f"job {source} has no outputs: it is {record.status.value}"
                                   + (f" [{record.error_code}]" if record.error_code else ""))
    return list(record.result.uris)


def _parse_uri(text: str, what: str) -> Any:
    from darkroom.common.storage import S3Uri

    try:
        return S3Uri.parse(text, allow_empty_key=True)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=what) from None


# -- workers ------------------------------------------------------------------
@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print each worker's full report as JSON.")
def workers(as_json: bool) -> None:
    """List live workers: device, memory, served and resident models, adapters.

    Exit codes: 0 listed (also when there are none); 69 Redis unreachable (services not running?).
    """
    from darkroom.common.clients import make_redis
    from darkroom.common.fleet import Fleet

    fleet = Fleet(make_redis(Settings.load()))
    found = fleet.workers(fresh=True)
    if as_json:
        click.echo(json.dumps({w.name: w.data for w in found}, indent=2))
        return
    if not found:
        click.echo(f"no live workers: none has sent a heartbeat ({settings_source()}); "
                   "start one with: darkroom worker --model ID=SOURCE")
    for w in found:
        d = w.data
        free = d.get("free_memory")
        memory = f", {free / 2**30:.1f} GiB free" if free else ""
        click.echo(f"{w.name}  {d.get('device')} ({d.get('device_name')}, {d.get('dtype')}{memory})  "
                   f"jobs done {d.get('jobs_done', 0)}")
        used, budget = d.get("resident_bytes", 0), d.get("memory_budget", 0)
        click.echo(f"  resident: {', '.join(w.resident_models) or '-'}  ({used / 2**20:.0f} of "
                   f"{budget / 2**20:.0f} MiB budget)")
        click.echo(f"  serves:   {', '.join(w.models)}")
        tuning = d.get("tuning") or {}
        if tuning:  # e.g. attention=sdpa, cpu_offload=none, vae_tiling, fuse_qkv
            click.echo("  tuning:   " + ", ".join(k if v is True else f"{k}={v}" for k, v in tuning.items()
                                                  if v is not False))


# -- services -----------------------------------------------------------------
@main.group()
def services() -> None:
    """Start, stop or inspect the embedded Redis and S3 server (for laptops, demos and tests)."""


@services.command("up")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None, help="Default: DARKROOM_STATE_DIR or .darkroom")
@click.option("--quiet", "-q", is_flag=True, help="Print one line instead of the settings.")
def services_up(state_dir: Path | None, quiet: bool) -> None:
    """Start a private Redis and a SeaweedFS S3 server on 127.0.0.1; print the settings to use.

    The settings go to <state dir>/services.env, where every darkroom command run from this
    folder finds them (from elsewhere, export them: set -a; . <file>; set +a).

    Exit codes: 0 running; 1 a server could not start (its log is named).
    """
    from .embedded import EmbeddedServicesError

    embedded = _embedded(state_dir)
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
        for name, label in (("redis", "Redis"), ("s3", "S3 server")):
            info = status[name]
            if info["running"]:
                click.echo(f"  {label:<9} running  {info['url']}  (pid {info['pid']})")
            else:
                click.echo(f"  {label:<9} stopped")
        if not all(info["running"] for info in status.values()):
            click.echo("start them with: darkroom services up")
    sys.exit(0 if all(info["running"] for info in status.values()) else 1)


def _embedded(state_dir: Path | None) -> Any:
    from .embedded import EmbeddedServices

    return EmbeddedServices(state_dir or Settings.load().state_dir)


def _client(client_cls: Any) -> Any:
    try:
        return client_cls(Settings.load())
    except DarkroomError as exc:
        raise click.ClickException(str(exc)) from None
