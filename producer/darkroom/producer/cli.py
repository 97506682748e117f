"""The producer's ``darkroom`` commands: submit, follow and cancel jobs; list workers; move files.

``submit``, ``status``, ``wait``, ``cancel``, ``watch``, ``workers``, ``upload`` and ``download``.

The ``darkroom`` host (:mod:`darkroom.common.cli`) finds them through the ``darkroom.commands``
entry points; it also turns expected conditions (services not running, credentials refused, a
missing bucket) into one line and an exit code, never a traceback.
"""

from __future__ import annotations

import json
import sys
import time
from enum import Enum
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin

import click

from darkroom.common.cli_errors import no_worker_notice, settings_source
from darkroom.common.errors import DarkroomError, InvalidJobError, JobCancelled, JobFailed, NotPermitted, WaitTimeout
from darkroom.common.events import EventType, JobEvent
from darkroom.common.jobs import Img2ImgJob, allowed_range
from darkroom.common.jobstore import JobNotFound, JobRecord
from darkroom.common.settings import Settings


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


@click.command()
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
@click.command()
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


@click.command()
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


@click.command()
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


@click.command()
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
@click.command()
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


@click.command()
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
@click.command()
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
        loading = f"; loading {d['loading_model']}" if d.get("loading_model") else ""
        click.echo(f"  resident: {', '.join(w.resident_models) or '-'}  ({used / 2**20:.0f} of "
                   f"{budget / 2**20:.0f} MiB budget{loading})")
        click.echo(f"  serves:   {', '.join(w.models)}")
        tuning = d.get("tuning") or {}
        if tuning:  # e.g. attention=sdpa, cpu_offload=none, vae_tiling, fuse_qkv
            click.echo("  tuning:   " + ", ".join(k if v is True else f"{k}={v}" for k, v in tuning.items()
                                                  if v is not False))


# -- services -----------------------------------------------------------------
def _client(client_cls: Any) -> Any:
    try:
        return client_cls(Settings.load())
    except DarkroomError as exc:
        raise click.ClickException(str(exc)) from None
