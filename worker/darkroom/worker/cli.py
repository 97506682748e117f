"""Worker-side ``darkroom`` commands: ``worker``, ``models make-tiny`` and ``demo``.

Registered through the ``darkroom.commands`` entry points; heavy imports
(torch, diffusers) happen inside the commands, so ``darkroom --help`` stays fast.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import click

from darkroom.common.errors import ConfigurationError, JobError
from darkroom.common.logs import configure_logging


def _quiet_libraries() -> None:
    from .libs import quiet_libraries

    quiet_libraries()


@click.command()
@click.option("--model", "models", multiple=True, metavar="ID=SOURCE",
              help="Serve model ID from SOURCE (a diffusers folder or s3:// prefix). Repeatable.")
@click.option("--models-file", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Model registry TOML file (also DARKROOM_MODELS_FILE).")
@click.option("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps (also DARKROOM_DEVICE).")
@click.option("--dtype", default=None, help="auto (default: fp16 on GPU, fp32 on CPU), float32, float16, bfloat16.")
@click.option("--gpus", default=None, metavar="all|0,1,...",
              help="Run one worker process per GPU (each sees only its device). Without a GPU, 'all' runs one "
                   "CPU worker.")
@click.option("--name", default=None, help="Worker name (default darkroom-<host>-<pid>).")
@click.option("--preload/--no-preload", default=True, show_default=True,
              help="Load registry models at start-up (in order, while they fit the memory budget).")
@click.option("--preload-model", "preload_models", multiple=True, metavar="ID",
              help="Preload only these models (repeatable); default: registry order while they fit.")
@click.option("--log-level", "loglevel", type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
              default="info", show_default=True)
@click.option("--loglevel", "legacy_loglevel", hidden=True, default=None, help="Old spelling of --log-level.")
def worker(models: tuple[str, ...], models_file: Path | None, device: str | None, dtype: str | None,
           gpus: str | None, name: str | None, preload: bool, preload_models: tuple[str, ...],
           loglevel: str, legacy_loglevel: str | None) -> None:
    """Run a worker: keep models resident and consume their queues.

    It takes jobs from the hot queues of the models it holds resident first, then from
    the cold queues of every model it serves (loading, and evicting the least recently
    used models beyond the memory budget, as needed).

    \b
    Examples:
      darkroom worker --model tiny=.darkroom/models/tiny
      darkroom worker --models-file registry.toml --gpus all

    SIGTERM (or Ctrl-C) lets the running jobs finish, then the worker exits.

    \b
    Exit codes: 0 stopped cleanly; 1 a setting, the registry or a preload failed (the reason is
    printed); 69 Redis unreachable (services not running?); 75 stopped itself after a fatal
    error (CUDA out of memory) so that its supervisor restarts it clean.
    """
    loglevel = (legacy_loglevel or loglevel).lower()
    if gpus is not None:
        _supervise(gpus, name, loglevel)
    _quiet_libraries()
    from darkroom.common.clients import make_redis
    from darkroom.common.placeholders import check_secrets

    from .app import create_app
    from .cancels import CancelListener
    from .context import Heartbeat, WorkerContext
    from .registry import ModelRegistry
    from .routing import FairFeeder
    from .settings import WorkerSettings

    overrides = {k: v for k, v in {"device": device, "dtype": dtype, "worker_name": name}.items() if v}
    try:
        settings = WorkerSettings.load(**overrides)
        check_secrets(settings)  # a placeholder password (change-me...) stops the worker here, in one line
        configure_logging(loglevel, settings.log_format, settings.worker_name or "worker")
        registry = ModelRegistry.build(models_file or settings.models_file, models, settings.models)
        ctx = WorkerContext.build(settings, registry)
        make_redis(settings).ping()  # settings checked: now fail at once, before loading models, if no services
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None
    log = logging.getLogger("darkroom.worker")
    log.info("worker %s on %s (%s, %s), models: %s", ctx.name, ctx.device.device, ctx.device.name,
             ctx.device.dtype, ", ".join(registry.ids))
    if preload:
        for model_id in preload_models or registry.ids:  # in order, until the memory budget is full
            evictions = ctx.models.evictions
            try:
                ctx.models.get(model_id)
            except JobError as exc:
                raise click.ClickException(f"cannot preload {model_id}: {exc.message}") from None
            if ctx.models.evictions > evictions:
                break
    ctx.refresh_report()
    heartbeat = ctx.heartbeat = Heartbeat(ctx)
    heartbeat.start()
    cancels = CancelListener(ctx).start()  # signed cancel requests (darkroom.common.cancels)
    feeder = FairFeeder(ctx.redis, registry.ids, depth=settings.fair_share_depth,
                        interval=settings.fair_share_interval_seconds).start()
    if settings.metrics_port:
        from .metrics import serve_metrics

        ctx.metrics.watch(ctx)
        serve_metrics(ctx, ctx.metrics, settings.metrics_host, settings.metrics_port)
    app = create_app(ctx)
    queues = ctx.queues.initial(ctx.models.resident)
    celery_worker = app.Worker(
        hostname=ctx.name, pool_cls="threads", concurrency=settings.slots, queues=queues, loglevel=loglevel.upper(),
        without_gossip=True, without_mingle=True, optimization="fair",
        quiet=loglevel in ("warning", "error"),  # no start-up banner unless info or debug was asked for
    )
    try:
        celery_worker.start()
    finally:
        feeder.stop()
        cancels.stop()
        heartbeat.stop()
    sys.exit(ctx.exit_code or celery_worker.exitcode or 0)


def _supervise(gpus: str, name: str | None, loglevel: str) -> None:
    """Re-run this command once per GPU (without --gpus) under a supervisor, or fall through on CPU."""
    import socket

    from .supervisor import Supervisor, cuda_device_count, plan_children

    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    count = cuda_device_count()
    try:
        children = plan_children(gpus, count, name or f"darkroom-{socket.gethostname()}")
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None
    if not children:
        logging.getLogger("darkroom.worker").info("no GPU found: running one CPU worker")
        return
    args = _args_without_gpus(sys.argv[2:])
    sys.exit(Supervisor(children, args).run())


def _args_without_gpus(argv: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--gpus" or arg == "--name":
            skip = True
        elif not arg.startswith(("--gpus=", "--name=")):
            out.append(arg)
    return out


@click.group()
def models() -> None:
    """Build the tiny test model; upload model folders to object storage."""


@models.command("make-tiny")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
@click.option("--overwrite", is_flag=True, help="Replace an existing model in DIRECTORY.")
def make_tiny(directory: Path, seed: int, overwrite: bool) -> None:
    """Write a tiny Stable-Diffusion-architecture model with RANDOM weights to DIRECTORY.

    Built offline from configs (no hub). Its outputs are noise-like: it exists to
    exercise the whole system fast. Point --model at a real diffusers folder for real images.

    Exit codes: 0 written (or already there); 1 DIRECTORY holds something else (see --overwrite).
    """
    _quiet_libraries()
    from .tiny import make_tiny_model

    try:
        path = make_tiny_model(directory, seed=seed, overwrite=overwrite)
    except FileExistsError as exc:
        raise click.ClickException(f"{exc}: choose another folder, or replace it with --overwrite") from None
    click.echo(str(path))


@models.command("push")
@click.argument("source", type=click.Path(path_type=Path, exists=True))
@click.argument("uri")
def push(source: Path, uri: str) -> None:
    """Upload a model folder (or one .safetensors file) to an s3:// prefix, recording each file's sha256.

    Workers verify every download against that sha256 (see "Cache of remote files" in the models guide).

    \b
    Exit codes: 0 uploaded; 1 refused (bad URI, missing bucket); 69 S3 unreachable; 77 credentials refused.
    """
    from darkroom.common.clients import make_s3_client
    from darkroom.common.objectstore import ObjectStore
    from darkroom.common.settings import Settings

    from .filecache import push_files

    store = ObjectStore(make_s3_client(Settings.load()))
    for target in push_files(store, source, uri):
        click.echo(target)


@click.command()
@click.option("--state-dir", type=click.Path(path_type=Path), default=None,
              help="Where services, the tiny model and the contact sheet live (default .darkroom).")
@click.option("--model-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Use this diffusers model folder instead of the tiny trained demo model.")
@click.option("--strengths", default="0.3,0.5,0.7,0.9", show_default=True, help="Comma-separated strengths.")
@click.option("--prompt", default=None,
              help="Default: 'red' for the demo model (it knows colour words), a lighthouse painting with --model-dir.")
def demo(state_dir: Path | None, model_dir: Path | None, strengths: str, prompt: str | None) -> None:
    """Run the whole path once: services, model, worker, jobs at several strengths, contact sheet.

    Exit codes: 0 every job succeeded; 1 something failed (the reason is printed); 130 interrupted.
    """
    _quiet_libraries()
    from .demo import run_demo

    values = [float(s) for s in strengths.split(",") if s.strip()]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(run_demo(state_dir=state_dir, model_dir=model_dir, strengths=values, prompt=prompt))
