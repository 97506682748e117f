"""``darkroom augment``: run a grid of img2img jobs over many sources and collect the outputs as a dataset.

Registered through the ``darkroom.commands`` entry points; imports the augment engine only when run.
"""

from __future__ import annotations

import json
import shlex
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from darkroom.common.errors import DarkroomError, FieldError, InvalidJobError
from darkroom.common.settings import Settings

if TYPE_CHECKING:
    from .augment import Augmentation, Plan, Progress

_GRID_FLAGS = ("model", "sources", "output_prefix", "prompts", "strengths", "seeds", "adapters", "set_fields", "vary",
               "inputs_prefix", "spec_file")
STOPPED_EXIT = 130


@click.command()
@click.option("--spec", "spec_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A TOML or JSON file of spec fields (model, sources, output_prefix, prompts, strengths, seeds, "
                   "adapters, vary, fields); flags override it.")
@click.option("--model", help="Model id from the workers' registry.")
@click.option("--source", "sources", help="s3:// prefix of images, a local folder (uploaded first), or a manifest "
                                          "(.jsonl/.csv/.parquet) with an 'image' column and per-row fields.")
@click.option("--output", "output_prefix", help="s3:// prefix of the run: outputs, manifest, run state.")
@click.option("--prompt", "prompts", multiple=True,
              help="A prompt template, repeatable: {stem}, {name} and manifest columns ({caption}) are filled in.")
@click.option("--strength", "strengths", multiple=True, help="Strengths, repeatable or comma separated: 0.3,0.6.")
@click.option("--seed", "seeds", multiple=True, help="Seeds, repeatable or as ranges: 0-3,7.")
@click.option("--adapter", "adapters", multiple=True,
              help="An adapter set, repeatable: none, or ID[:WEIGHT][+ID2[:WEIGHT]] (ids or s3://...safetensors).")
@click.option("--set", "set_fields", multiple=True, metavar="FIELD=VALUE",
              help="A job field for every job (JSON value), e.g. num_inference_steps=30.")
@click.option("--vary", multiple=True, metavar="FIELD=V1,V2", help="Another grid axis, e.g. guidance_scale=5,7.5.")
@click.option("--inputs-prefix", help="Where local images are uploaded (default {output}/_augment/inputs).")
@click.option("--resume", "resume_prefix", metavar="PREFIX", help="Resume the run saved at this output prefix.")
@click.option("--dry-run", is_flag=True, help="Print the plan (counts, what is done, an estimate); change nothing.")
@click.option("--window", type=click.IntRange(min=1), default=256, show_default=True,
              help="Most jobs queued or running at once.")
@click.option("--no-retry-failed", is_flag=True, help="Leave cells that failed or were cancelled as they are.")
@click.option("--update-spec", is_flag=True, help="Replace the spec saved at the output prefix by this one "
                                                  "(finished cells are reused).")
@click.option("--collect-only", is_flag=True, help="Submit nothing: write the manifest from what has ended (and export).")
@click.option("--export", "export_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Then download the dataset here (images + metadata.jsonl, for datasets' imagefolder).")
@click.option("--contact-sheet", "sheet_path", type=click.Path(dir_okay=False, path_type=Path),
              help="With --export: also draw a contact sheet (PNG) of the first sources and their outputs.")
def augment(resume_prefix: str | None, dry_run: bool, window: int, no_retry_failed: bool, update_spec: bool,
            collect_only: bool, export_dir: Path | None, sheet_path: Path | None, **grid: Any) -> None:
    """Augment a dataset: every source × prompts × strengths × seeds (× adapter sets) as bulk img2img jobs.

    Job ids come from each source's identity (ETag/version) and the cell's parameters, so running the same
    command again skips what succeeded and resubmits what failed or never ran. Ctrl-C stops submitting;
    jobs already sent finish on the workers.

    Example: darkroom augment --model tiny --source s3://darkroom/photos/ --output s3://darkroom/aug/v1
    --prompt "{stem}, watercolor" --strength 0.4,0.6 --seed 0-3 --export dataset/

    \b
    Exit codes: 0 every cell succeeded (or --dry-run); 1 some cells failed, or the spec was refused;
    2 usage error; 69 Redis or S3 unreachable (services not running?); 77 credentials refused;
    130 stopped with Ctrl-C (run the same command again to resume).
    """
    from .client import Client

    if sheet_path is not None and export_dir is None:
        raise click.UsageError("--contact-sheet draws from the exported images: give --export DIR too")
    try:
        with Client(Settings.load()) as client:
            run = _open_run(client, resume_prefix, grid)
            code = _collect(run, export_dir, sheet_path) if collect_only else \
                _dry_run(run, not no_retry_failed, window) if dry_run else \
                _run(run, window, not no_retry_failed, update_spec, export_dir, sheet_path)
    except DarkroomError as exc:  # InvalidJobError included: the message lists every bad field
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:  # a second Ctrl-C
        click.echo("interrupted", err=True)
        code = STOPPED_EXIT
    sys.exit(code)


# -- the spec --------------------------------------------------------------------
def _open_run(client: Any, resume_prefix: str | None, grid: dict[str, Any]) -> Augmentation:
    from .augment import Augmentation, AugmentSpec

    if resume_prefix is not None:
        given = [name for name in _GRID_FLAGS if grid.get(name)]
        if given:
            raise click.UsageError("--resume continues the spec saved at the prefix; leave out "
                                   + ", ".join("--" + g.replace("_", "-") for g in given))
        return Augmentation.resume(client, resume_prefix)
    return Augmentation(client, AugmentSpec.build(spec_fields(**grid)))


def spec_fields(*, spec_file: Path | None, model: str | None, sources: str | None, output_prefix: str | None,
                prompts: tuple[str, ...], strengths: tuple[str, ...], seeds: tuple[str, ...],
                adapters: tuple[str, ...], set_fields: tuple[str, ...], vary: tuple[str, ...],
                inputs_prefix: str | None) -> dict[str, Any]:
    """The spec a command line describes: the file's fields, then the flags'."""
    from .augment import load_spec_file, parse_adapter_set, parse_seeds

    data: dict[str, Any] = load_spec_file(spec_file) if spec_file is not None else {}
    given = {"model": model, "sources": _absolute(sources), "output_prefix": output_prefix,
             "inputs_prefix": inputs_prefix, "prompts": list(prompts) or None,
             "strengths": [_number(v, "strengths") for s in strengths for v in _split(s)] or None,
             "seeds": [n for s in seeds for n in parse_seeds(s)] or None,
             "adapters": [parse_adapter_set(a) for a in adapters] or None}
    data.update({k: v for k, v in given.items() if v is not None})
    if isinstance(data.get("sources"), str) and spec_file is not None and not data["sources"].startswith("s3://"):
        data["sources"] = str((spec_file.parent / data["sources"]).resolve()) if sources is None else data["sources"]
    data["fields"] = {**data.get("fields", {}), **dict(_assignment(s, "--set") for s in set_fields)}
    data["vary"] = {**data.get("vary", {}),
                    **{k: v if isinstance(v, list) else [v] for k, v in (_assignment(s, "--vary", True) for s in vary)}}
    return data


def _absolute(sources: str | None) -> str | None:
    """Local paths are kept absolute in the saved spec, so --resume works from any folder."""
    if sources is None or sources.startswith("s3://"):
        return sources
    return str(Path(sources).expanduser().resolve())


def _split(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _number(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InvalidJobError([FieldError(where, text, "not a number", "numbers, comma separated")]) from None


def _assignment(text: str, flag: str, as_list: bool = False) -> tuple[str, Any]:
    name, sep, raw = text.partition("=")
    if not sep or not name.strip():
        raise click.UsageError(f"{flag} wants FIELD=VALUE, got {text!r}")
    values = [_json_value(v) for v in _split(raw)] if as_list else _json_value(raw)
    return name.strip(), values


def _json_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


# -- the three modes --------------------------------------------------------------------
def _dry_run(run: Augmentation, retry_failed: bool, window: int) -> int:
    plan = run.plan()
    _describe(run, plan, retry_failed, window)
    click.echo(f"  estimate: {run.estimate(plan, retry_failed).describe()}")
    click.echo("dry run: nothing was uploaded, saved or submitted")
    return 0


def _run(run: Augmentation, window: int, retry_failed: bool, update_spec: bool, export_dir: Path | None,
         sheet_path: Path | None) -> int:
    stop = threading.Event()
    bar = ProgressBar(enabled=sys.stderr.isatty())
    with _stopping_on_sigint(stop):
        report = run.run(window=window, retry_failed=retry_failed, update_spec=update_spec, stop=stop,
                         on_progress=bar.update, on_plan=lambda plan: _describe(run, plan, retry_failed, window))
    bar.close(report.progress)
    if not report.finished:
        _stopped(run, report.progress)
        return STOPPED_EXIT
    assert report.dataset is not None
    _finished(run, report.progress.failed, report.dataset)
    _export(run, export_dir, sheet_path)
    return 1 if report.progress.failed else 0


def _collect(run: Augmentation, export_dir: Path | None, sheet_path: Path | None) -> int:
    files = run.collect()
    _finished(run, files.failed, files)
    _export(run, export_dir, sheet_path)
    return 0


# -- printing ----------------------------------------------------------------------------------
def _describe(run: Augmentation, plan: Plan, retry_failed: bool, window: int) -> None:
    spec = run.spec
    count = plan.count()
    click.echo(f"run {run.run_id}: {len(run.sources)} sources × {spec.describe()} = {len(run.cells)} jobs "
               f"-> {spec.output_prefix}")
    again = "resubmitted" if retry_failed else "left as they are"
    click.echo(f"  done {plan.done} · failed or cancelled {plan.ended_badly} ({again}) · queued or running "
               f"{plan.in_flight} · never submitted {count['new']}")
    click.echo(f"  to submit: {len(plan.to_follow(retry_failed)) - plan.in_flight} ({spec.priority.value} priority, "
               f"at most {window} in flight)")


def _stopped(run: Augmentation, progress: Progress) -> None:
    click.echo(f"stopped: {progress.done} of {progress.total} done, {progress.failed} failed, {progress.in_flight} "
               "still queued or running (they finish on the workers)", err=True)
    click.echo(f"resume with the same command:\n  {shlex.join(['darkroom', *sys.argv[1:]])}\n"
               f"or: darkroom augment --resume {run.spec.output_prefix}", err=True)


def _finished(run: Augmentation, failed: int, files: Any) -> None:
    click.echo(f"finished: {files.images} images, {failed} failed")
    parquet = f", {files.manifest_parquet}" if files.manifest_parquet else \
        " (no manifest.parquet: pip install 'darkroom-producer[augment]')"
    click.echo(f"  manifest: {files.manifest} ({files.rows} rows){parquet}")
    click.echo(f"  imagefolder metadata: {files.metadata} ({files.images} images)")
    if files.failed:
        codes = Counter(row.get("error_code") or "-" for row in _failures(run))
        click.echo(f"  failures: {files.failures}: " + ", ".join(f"{c} {n}" for c, n in codes.most_common()))


def _failures(run: Augmentation) -> list[dict[str, Any]]:
    from darkroom.common.storage import S3Uri

    data = run.client.store.get_bytes(S3Uri.parse(run.spec.output_prefix, allow_empty_key=True).join("failures.jsonl"))
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def _export(run: Augmentation, export_dir: Path | None, sheet_path: Path | None) -> None:
    if export_dir is None:
        return
    count = run.export(export_dir)
    click.echo(f"exported {count} images and metadata.jsonl to {export_dir}: "
               f'datasets.load_dataset("imagefolder", data_dir="{export_dir}")')
    if sheet_path is not None:
        from .augment import read_metadata
        from .augment.sheet import contact_sheet

        contact_sheet(read_metadata(run.spec.output_prefix, run.client.store), export_dir, run.client.store,
                      sheet_path)
        click.echo(f"contact sheet: {sheet_path}")


class ProgressBar:
    """Done/failed/in-flight counts, rate and ETA: one redrawn line on a terminal, a line every 10 s otherwise."""

    def __init__(self, enabled: bool, interval: float = 10.0) -> None:
        self.enabled, self.interval = enabled, interval
        self._last = 0.0
        self._drawn = False

    def update(self, progress: Progress) -> None:
        if self.enabled:
            click.echo("\r" + self.line(progress) + "\x1b[K", nl=False, err=True)
            self._drawn = True
        elif time.monotonic() - self._last >= self.interval:
            self._last = time.monotonic()
            click.echo(self.line(progress), err=True)

    def close(self, progress: Progress) -> None:
        if self._drawn:
            click.echo("", err=True)
        elif not self.enabled:
            click.echo(self.line(progress), err=True)

    @staticmethod
    def line(p: Progress) -> str:
        from .augment.plan import format_duration

        ended = p.done + p.failed
        filled = int(24 * ended / p.total) if p.total else 24
        eta = p.eta_seconds
        return (f"[{'#' * filled}{'.' * (24 - filled)}] {ended}/{p.total}  done {p.done}  failed {p.failed}  "
                f"in flight {p.in_flight}  {p.rate:.1f} jobs/s  ETA {format_duration(eta) if eta is not None else '?'}")


class _stopping_on_sigint:
    """Ctrl-C sets ``stop`` (the run stops submitting at its next step); a second Ctrl-C interrupts at once."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.previous: Any = None

    def __enter__(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum: int, frame: Any) -> None:
        self.stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        click.echo("\nstopping: a batch being sent goes out, no job after it (Ctrl-C again to quit at once)",
                   err=True)
