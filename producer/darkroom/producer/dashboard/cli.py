"""The ``darkroom dashboard`` command."""

from __future__ import annotations

import logging

import click
from pydantic import ValidationError

from darkroom.common.errors import DarkroomError
from darkroom.common.logs import configure_logging
from darkroom.common.placeholders import check_secrets

from .settings import DashboardSettings

__all__ = ["dashboard"]


@click.command()
@click.option("--host", default=None, help="Address to listen on [default: DARKROOM_DASHBOARD_HOST or 127.0.0.1]; "
                                           "a non-loopback address needs credentials.")
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="Port [default: DARKROOM_DASHBOARD_PORT or 8090].")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
def dashboard(host: str | None, port: int | None, log_level: str) -> None:
    """Serve the web dashboard: fleet, queues, jobs, gallery, augmentation runs, failed webhooks.

    It reads the fleet's Redis and object storage (read-only credentials suffice; cancelling a job or
    replaying a webhook writes to Redis). Credentials: DARKROOM_DASHBOARD_TOKEN (admin),
    DARKROOM_DASHBOARD_VIEWER_TOKEN (read-only), or DARKROOM_DASHBOARD_USER/_PASSWORD (admin);
    without any it only listens on a loopback address.

    Exit codes: 0 stopped cleanly; 1 a setting is wrong (e.g. a public address without credentials);
    69 Redis unreachable.
    """
    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        raise click.ClickException(f"the dashboard needs its extra: pip install 'darkroom-producer[dashboard]' "
                                   f"({exc})") from None
    overrides = {"dashboard_host": host, "dashboard_port": port}
    try:
        settings = DashboardSettings.load(**{k: v for k, v in overrides.items() if v is not None})
        settings.check_binding()
        check_secrets(settings, [("DARKROOM_DASHBOARD_TOKEN", settings.dashboard_token),
                                 ("DARKROOM_DASHBOARD_VIEWER_TOKEN", settings.dashboard_viewer_token),
                                 ("DARKROOM_DASHBOARD_PASSWORD", settings.dashboard_password)])
        app = create_app(settings)
    except ValidationError as exc:
        raise click.ClickException(f"dashboard settings: {exc}") from None
    except DarkroomError as exc:
        raise click.ClickException(str(exc)) from None
    configure_logging(log_level, settings.log_format, "dashboard")
    roles = "open to this machine (no credentials set)" if not settings.has_credentials else "credentials required"
    logging.getLogger("darkroom.dashboard").info(
        "dashboard on http://%s:%d/ (%s)", _url_host(settings.dashboard_host), settings.dashboard_port, roles)
    uvicorn.run(app, host=settings.dashboard_host, port=settings.dashboard_port, log_level=log_level,
                access_log=False, timeout_graceful_shutdown=3, log_config=None)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
