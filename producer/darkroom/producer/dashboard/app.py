"""The dashboard's web application (Starlette): pages, images, live events and the two actions.

Pages are rendered on the server (Jinja2) and kept live by ``static/dashboard.js``, which listens
to ``GET /events`` (server-sent events, see :mod:`.live`) and refreshes what changed without a
reload. Every route but ``/healthz`` and ``/static`` needs credentials (see :mod:`.auth`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Receive, Scope, Send

from darkroom.common.boundaries import ReferencePolicy
from darkroom.common.clients import make_async_redis, make_redis, make_s3_client
from darkroom.common.errors import DarkroomError, ObjectNotFoundError
from darkroom.common.lifecycle import Lifecycle
from darkroom.common.objectstore import ObjectStore
from darkroom.common.producers import job_namespace
from darkroom.common.redaction import redact_url
from darkroom.common.status import JobStatus
from darkroom.common.storage import S3Uri

from .._submission import owner
from .auth import CSRF_HEADER, Authenticator, Principal, sees
from .live import LiveHub, sse
from .media import MAX_MEDIA_BYTES, MediaKind, input_object, output_object, sniff_image_type
from .settings import DashboardSettings
from .views import JobFilter, Reader

__all__ = ["create_app", "Dashboard"]

log = logging.getLogger("darkroom.dashboard")
HERE = Path(__file__).parent
SINCE = {"15m": 900, "1h": 3600, "6h": 6 * 3600, "24h": 24 * 3600, "7d": 7 * 24 * 3600}
_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'")


class Dashboard:
    """The collaborators the routes use, built once per process from the settings."""

    def __init__(self, settings: DashboardSettings, *, client: redis.Redis | None = None,
                 store: ObjectStore | None = None) -> None:
        self.settings = settings
        self.auth = Authenticator(settings)
        self.redis = client or make_redis(settings)
        self.store = store or ObjectStore(make_s3_client(settings))
        self.references = ReferencePolicy.from_settings(settings)  # what an input proxy may read
        self.reader = Reader(self.redis, ttl_seconds=settings.status_ttl_seconds, references=self.references)
        self.hub = LiveHub(make_async_redis(settings), self.reader.digests, settings.dashboard_poll_seconds)
        self.templates = Jinja2Templates(directory=HERE / "templates")
        self.templates.env.filters.update(ago=_ago, when=_when, seconds=_seconds, size=_size, short=_short,
                                          redact_url=redact_url)

    # -- pages -----------------------------------------------------------
    def page(self, request: Request, name: str, **context: Any) -> Response:
        principal: Principal = request.scope["principal"]
        context.update(principal=principal, csrf=self.auth.csrf_token(principal), now=datetime.now(UTC).timestamp(),
                       page=name.removesuffix(".html"))
        return self.templates.TemplateResponse(request, name, context)

    def fleet(self, request: Request) -> Response:
        return self.page(request, "fleet.html", workers=self.reader.fleet())

    def queues(self, request: Request) -> Response:
        return self.page(request, "queues.html", view=self.reader.queues(), rates=self.hub.rates(),
                         window=self.hub.rate_window_seconds)

    def jobs(self, request: Request) -> Response:
        params = request.query_params
        status = params.get("status") or None
        since = params.get("since") or "24h"
        bound = request.scope["principal"].producer  # a producer-bound viewer: its own jobs, whatever it asks
        wanted = JobFilter(
            status=JobStatus(status) if status in set(JobStatus) else None,
            model=params.get("model") or None,
            producer=bound or params.get("producer") or None,
            since=datetime.now(UTC).timestamp() - SINCE[since] if since in SINCE else None,
            bound=bound is not None,
        )
        rows, scanned = self.reader.job_rows(wanted, request.scope["principal"].role)
        return self.page(request, "jobs.html", rows=rows, scanned=scanned, wanted=wanted, since=since,
                         statuses=list(JobStatus), models=self.reader.models(), periods=[*SINCE, "all"])

    def job(self, request: Request) -> Response:
        detail = self.reader.job(request.path_params["job_id"], request.scope["principal"].role)
        if detail is None or not sees(request.scope["principal"], detail.record.job_id, owner(detail.record)):
            return self.page(request, "missing.html", job_id=request.path_params["job_id"])
        return self.page(request, "job.html", detail=detail, record=detail.record)

    def gallery(self, request: Request) -> Response:
        principal: Principal = request.scope["principal"]
        return self.page(request, "gallery.html", tiles=self.reader.gallery(principal.role, producer=principal.producer))

    def augment(self, request: Request) -> Response:
        if request.scope["principal"].producer is not None:
            return _not_for_bound()
        return self.page(request, "augment.html", runs=self.reader.runs())

    def webhooks(self, request: Request) -> Response:
        if request.scope["principal"].producer is not None:
            return _not_for_bound()
        return self.page(request, "webhooks.html", deliveries=self.reader.dead_webhooks(),
                         counts=self.reader.dead.counts())

    # -- images ------------------------------------------------------------
    def media(self, request: Request) -> Response:
        """An input or output picture, proxied from object storage if the visitor may see it."""
        job_id = request.path_params["job_id"]
        role = request.scope["principal"].role
        record = self.reader.jobs.get(job_id)
        if record is None or not sees(request.scope["principal"], job_id, owner(record)):
            return PlainTextResponse("no such job\n", status_code=404)
        uri: str | None = None
        if request.path_params.get("index") is None:
            uri = input_object(record, role, self.references)
        elif record.result is not None:
            try:
                output = record.result.outputs[int(request.path_params["index"])]
                uri = output_object(output, MediaKind(request.path_params["kind"]), role)
            except (IndexError, ValueError):
                uri = None
        if uri is None:
            return PlainTextResponse("no such picture, or not for this role\n", status_code=404)
        try:
            data = self.store.get_bytes(S3Uri.parse(uri), max_bytes=MAX_MEDIA_BYTES)
        except ObjectNotFoundError:
            return PlainTextResponse("the object is gone from storage\n", status_code=404)
        except DarkroomError as exc:
            return PlainTextResponse(f"storage: {exc}\n", status_code=502)
        media_type = sniff_image_type(data)
        if media_type is None:
            return PlainTextResponse("not a raster image\n", status_code=415)
        return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})

    # -- actions -------------------------------------------------------------
    def cancel(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        if self.reader.jobs.get(job_id) is None:
            return JSONResponse({"error": f"no job {job_id!r}"}, status_code=404)
        record = Lifecycle(self.reader.jobs.redis, ttl_seconds=self.reader.jobs.ttl).cancel_job(
            job_id, "cancelled from the dashboard")
        log.info("job %s cancel requested from the dashboard: now %s", job_id, record.status.value)
        return JSONResponse({"job_id": job_id, "status": record.status.value})

    def replay(self, request: Request) -> Response:
        webhook_id = request.path_params["webhook_id"]
        if not self.reader.dead.replay(webhook_id):
            return JSONResponse({"error": f"no failed webhook {webhook_id!r}"}, status_code=404)
        log.info("webhook %s replayed from the dashboard", webhook_id)
        return JSONResponse({"webhook_id": webhook_id, "replayed": True})

    async def events(self, request: Request) -> Response:
        bound = request.scope["principal"].producer
        allow = None if bound is None else _own_events(bound)
        return StreamingResponse(sse(self.hub, allow=allow), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def create_app(settings: DashboardSettings, **collaborators: Any) -> Starlette:
    """The dashboard application; ``collaborators`` (client, store) replace the ones made from settings."""
    board = Dashboard(settings, **collaborators)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        live = asyncio.create_task(board.hub.run())
        try:
            yield
        finally:
            live.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await live
            await board.hub.redis.aclose()
            board.redis.close()

    routes = [
        Route("/", lambda request: RedirectResponse("/fleet", status_code=303)),
        Route("/healthz", lambda request: PlainTextResponse("ok\n")),
        Route("/fleet", board.fleet),
        Route("/queues", board.queues),
        Route("/jobs", board.jobs),
        Route("/jobs/{job_id}", board.job),
        Route("/gallery", board.gallery),
        Route("/augment", board.augment),
        Route("/webhooks", board.webhooks),
        Route("/media/{job_id}/input", board.media),
        Route("/media/{job_id}/out/{index:int}/{kind}", board.media),
        Route("/events", board.events),
        Route("/api/jobs/{job_id}/cancel", board.cancel, methods=["POST"]),
        Route("/api/webhooks/{webhook_id}/replay", board.replay, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.add_middleware(_Guard, auth=board.auth)
    app.state.dashboard = board
    return app


class _Guard:
    """Authenticates every request but ``/healthz`` and ``/static``; lets only admins' same-origin actions through;
    adds security headers to every response."""

    def __init__(self, app: ASGIApp, auth: Authenticator) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = _with_headers(send)
        path: str = scope["path"]
        if path == "/healthz" or path.startswith("/static/"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        principal = self.auth.authenticate(headers.get("authorization"), headers.get("host"))
        if principal is None:
            await _refuse(send, 401, "credentials needed: a dashboard token (Bearer, or as the basic-auth password)")
            return
        if scope["method"] not in ("GET", "HEAD"):
            allowed = path.startswith("/api/") and self.auth.may_act(
                principal, headers.get(CSRF_HEADER), headers.get("origin"), headers.get("host"))
            if not allowed:
                why = "admin role needed" if not principal.is_admin else "missing or wrong CSRF token, or another origin"
                await _refuse(send, 403, f"refused: {why}")
                return
        scope["principal"] = principal
        await self.app(scope, receive, send)


def _not_for_bound() -> Response:
    return PlainTextResponse("not shown to a viewer bound to one producer\n", status_code=403)


def _own_events(producer: str) -> Callable[[str, str], bool]:
    """What a producer-bound viewer's live stream passes: its own jobs' events and the fleet and queue views."""
    space = job_namespace(producer)

    def allow(name: str, data: str) -> bool:
        if name != "job":
            return name in ("hello", "resync", "fleet", "queues")
        try:
            job_id = json.loads(data).get("job_id")
        except (ValueError, AttributeError):
            return False
        return isinstance(job_id, str) and job_id.startswith(space)

    return allow


def _with_headers(send: Send) -> Send:
    async def wrapped(message: Any) -> None:
        if message["type"] == "http.response.start":
            message.setdefault("headers", [])
            message["headers"] = [*message["headers"],
                                  (b"content-security-policy", _CSP.encode()),
                                  (b"x-content-type-options", b"nosniff"),
                                  (b"referrer-policy", b"same-origin"),
                                  (b"x-frame-options", b"DENY")]
        await send(message)
    return wrapped


async def _refuse(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Basic realm="darkroom", charset="UTF-8"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# -- template filters -----------------------------------------------------------
def _ago(epoch: float | None, now: float | None = None) -> str:
    if not epoch:
        return "-"
    seconds = max(0.0, (now or datetime.now(UTC).timestamp()) - float(epoch))
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.1f} d ago"


def _when(value: datetime | float | str | None) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return value
    else:
        moment = value if isinstance(value, datetime) else datetime.fromtimestamp(float(value), UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _size(value: float | int | None) -> str:
    if not value:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit in ("B", "KiB") else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _short(value: str, width: int = 12) -> str:
    return value if len(value) <= width else value[: width - 1] + "…"
