"""Worker-side ``darkroom`` commands: ``worker`` and ``models push``.

Registered through the ``darkroom.commands`` entry points; heavy imports
(torch, diffusers) happen inside the commands, so ``darkroom --help`` stays fast.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from darkroom.common.cli import EntryPointGroup
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
@click.option("--simulate", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              metavar="PROFILE", help="Simulate the engine: sleep for the timings of PROFILE (JSON or TOML) instead "
                                      "of running pipelines; no torch (fleet simulations, see bench/fleet_sim.py).")
def worker(models: tuple[str, ...], models_file: Path | None, device: str | None, dtype: str | None,
           gpus: str | None, name: str | None, preload: bool, preload_models: tuple[str, ...],
           loglevel: str, legacy_loglevel: str | None, simulate: Path | None) -> None:
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
    from .startup import StartupClock

    clock = StartupClock()
    clock.mark("interpreter")  # from the process's start: the interpreter and the command line
    if simulate is None:
        _quiet_libraries()
    from darkroom.common.clients import make_redis
    from darkroom.common.placeholders import check_secrets

    from .app import create_app
    from .assist import Assist
    from .cancels import CancelListener
    from .compile_cache import use_worker_compile_cache
    from .context import Heartbeat, WorkerContext
    from .registry import ModelRegistry
    from .routing import FairFeeder
    from .settings import WorkerSettings

    clock.mark("imports")
    overrides = {k: v for k, v in {"device": device, "dtype": dtype, "worker_name": name}.items() if v}
    try:
        settings = WorkerSettings.load(**overrides)
        check_secrets(settings)  # a placeholder password (change-me...) stops the worker here, in one line
        configure_logging(loglevel, settings.log_format, settings.worker_name or "worker")
        use_worker_compile_cache(settings.state_dir, settings.compile)  # before anything compiles
        if simulate is not None:
            from .simulate import Profile, build_context, simulated_registry

            profile = Profile.load(simulate)
            given = (ModelRegistry.build(models_file or settings.models_file, models, settings.models)
                     if models or models_file or settings.models_file or settings.models else None)
            registry = simulated_registry(profile, given)
            ctx = build_context(settings, registry, profile)
        else:
            registry = ModelRegistry.build(models_file or settings.models_file, models, settings.models)
            ctx = WorkerContext.build(settings, registry)
        make_redis(settings).ping()  # settings checked: now fail at once, before loading models, if no services
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None
    clock.mark("services")
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
    clock.mark("models")
    ctx.refresh_report()
    heartbeat = Heartbeat(ctx)
    heartbeat.start()
    cancels = CancelListener(ctx).start()  # signed cancel requests (darkroom.common.cancels)
    feeder = FairFeeder(ctx.redis, registry.ids, depth=settings.fair_share_depth,
                        interval=settings.fair_share_interval_seconds).start()
    assist = (Assist(ctx, queue_depth=settings.assist_queue_depth, interval=settings.assist_interval_seconds,
                     hold=settings.assist_hold_seconds, work_per_load=settings.assist_work_per_load,
                     load_first=settings.assist_load_first).start()
              if settings.assist else None)
    if settings.metrics_port:
        from .metrics import serve_metrics

        ctx.metrics.watch(ctx)
        serve_metrics(ctx, ctx.metrics, settings.metrics_host, settings.metrics_port)
    app = create_app(ctx)
    clock.log_when_ready(app)  # one line: where the start-up seconds went
    queues = ctx.queues.initial(ctx.models.resident)
    celery_worker = app.Worker(
        hostname=ctx.name, pool_cls="threads", concurrency=settings.slots, queues=queues, loglevel=loglevel.upper(),
        without_gossip=True, without_mingle=True, optimization="fair",
        quiet=loglevel in ("warning", "error"),  # no start-up banner unless info or debug was asked for
    )
    try:
        celery_worker.start()
    finally:
        if assist is not None:
            assist.stop()
        feeder.stop()
        cancels.stop()
        heartbeat.stop()
    sys.exit(ctx.state.exit_code or celery_worker.exitcode or 0)


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


@click.group(cls=EntryPointGroup, entry_point_group="darkroom.commands.models")
def models() -> None:
    """Model folders: upload them to object storage (push); build tiny test models (make-tiny, from darkroom-dev)."""


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
