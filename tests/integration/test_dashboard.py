"""The web dashboard in a real headless Chromium (Debian's, driven by Playwright) against a running stack:
the session's Redis + S3 server, a real worker, and `darkroom dashboard` as a subprocess.

Each browser test saves a screenshot: to a temporary folder, or to DARKROOM_SCREENSHOT_DIR (``make
screenshots`` regenerates the dashboard guide's docs/images/dashboard-*.png this way).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from darkroom.common.augment_keys import AUGMENT_RUNS_KEY, augment_run_key
from darkroom.common.events import EventType, JobEvent
from darkroom.common.settings import Settings
from darkroom.common.status import JobStatus
from darkroom.dev.process import WorkerProcess
from darkroom.producer.client import Client
from darkroom.producer.webhooks.deliveries import DEAD_KEY, Attempt, Delivery

from .helpers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # a real browser (chromium) per page

ADMIN = "admin-token-for-tests"
VIEWER = "viewer-token-for-tests"
GALLERY_CLIP = {"x": 0, "y": 0, "width": 1280, "height": 520}  # noise pictures compress badly: keep PNGs small
TIMEOUT_MS = 180_000  # how long the browser waits for a state (never a measured limit: the machine may be busy)


@dataclass
class DashboardProcess:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path


@pytest.fixture(scope="module")
def dashboard(services: object, settings: Settings) -> Iterator[DashboardProcess]:
    """`darkroom dashboard` on a free port with an admin and a viewer token."""
    port = free_port()
    log = settings.state_dir / "logs" / f"dashboard-{port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **services.as_env(), "DARKROOM_STATE_DIR": str(settings.state_dir),  # type: ignore[attr-defined]
           "DARKROOM_DASHBOARD_TOKEN": ADMIN, "DARKROOM_DASHBOARD_VIEWER_TOKEN": VIEWER,
           "DARKROOM_DASHBOARD_POLL_SECONDS": "0.5"}
    command = [str(Path(sys.executable).parent / "darkroom"), "dashboard", "--port", str(port)]
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, f"the dashboard exited with {proc.returncode}:\n{log.read_text()}"
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, f"the dashboard did not answer in 60 s:\n{log.read_text()}"
        time.sleep(0.2)
    try:
        yield DashboardProcess(url, proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    executable = os.environ.get("DARKROOM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    assert executable, "the browser tests need Debian's chromium: `make setup` installs it (apt-get install chromium)"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = os.environ.get("DARKROOM_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        return Path(target)
    return tmp_path_factory.mktemp("screenshots")


def _page(browser: Any, token: str | None) -> Any:
    credentials = {"username": "tester", "password": token} if token else None
    context = browser.new_context(http_credentials=credentials, viewport={"width": 1280, "height": 760})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.js_errors = errors
    return page


@pytest.fixture()
def admin(browser: Any) -> Iterator[Any]:
    page = _page(browser, ADMIN)
    yield page
    assert not page.js_errors, page.js_errors
    page.context.close()


@pytest.fixture()
def viewer(browser: Any) -> Iterator[Any]:
    page = _page(browser, VIEWER)
    yield page
    assert not page.js_errors, page.js_errors
    page.context.close()


@pytest.fixture(scope="module")
def input_uri(settings: Settings) -> str:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64), (38, 84, 150))
    ImageDraw.Draw(image).ellipse((14, 14, 50, 50), fill=(232, 178, 64))
    with Client(settings) as client:
        return client.upload(image, f"s3://darkroom/inputs/dashboard-{uuid.uuid4().hex[:8]}.png")


def _shot(page: Any, path: Path, **options: Any) -> None:
    """Save a screenshot as a 256-colour PNG (noise pictures from the random tiny model compress badly)."""
    from io import BytesIO

    from PIL import Image

    Image.open(BytesIO(page.screenshot(**options))).convert("RGB").quantize(256).save(path, optimize=True)


def _open(page: Any, url: str) -> None:
    """Load a dashboard page and wait until its live connection is up."""
    response = page.goto(url)
    assert response is not None and response.status == 200, response and response.status
    page.locator("body[data-live=connected]").wait_for()


def _job(input_uri: str, **fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "image": input_uri, "prompt": "a sun over the sea, oil painting", "strength": 0.6,
            "num_inference_steps": 10, **fields}


def _http(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers


def _basic(token: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"someone:{token}".encode()).decode()}


# -- the live job list --------------------------------------------------------------
def test_a_submitted_job_appears_moves_through_its_states_live_and_shows_its_thumbnail(
        dashboard: DashboardProcess, worker: WorkerProcess, client: Client, admin: Any, input_uri: str,
        shots: Path) -> None:
    from playwright.sync_api import expect

    # given the job list open in the browser, connected to the live stream
    _open(admin, dashboard.url + "/jobs")
    admin.evaluate("window.notReloaded = true")
    # when a job is submitted (enough steps that the worker reports progress along the way)
    handle = client.submit(_job(input_uri, strength=1.0, num_inference_steps=60, seed=11))
    # then its row appears without a reload, shows each state as it happens, and finally its thumbnail
    row = admin.locator(f'tr[data-job="{handle.job_id}"]')
    expect(row).to_be_visible()
    status = row.locator("[data-job-status]")
    expect(status).to_have_text("succeeded")
    # (the text can come from a refreshed row a moment before the live "succeeded" event extends the trail)
    expect(status).to_have_attribute("data-trail", "queued started succeeded")
    assert int(status.get_attribute("data-progress-events") or 0) >= 1  # step i of n arrived live too
    thumb = row.locator("img[data-thumb]")
    expect(thumb).to_have_attribute("data-loaded", "1")
    assert thumb.get_attribute("src") == f"/media/{handle.job_id}/out/0/thumb"
    assert admin.evaluate("window.notReloaded") is True
    _shot(admin, shots / "dashboard-jobs.png")

    # and its page shows the input beside the output, with parameters, timings and history
    _open(admin, f"{dashboard.url}/jobs/{handle.job_id}")
    expect(admin.locator("figure.input img")).to_have_attribute("data-loaded", "1")
    expect(admin.locator("figure.output img")).to_have_attribute("data-loaded", "1")
    expect(admin.locator(".params")).to_contain_text("num_inference_steps")
    expect(admin.locator("#history")).to_contain_text("finished")
    _shot(admin, shots / "dashboard-job.png", full_page=True)


def test_the_worker_writes_a_small_webp_thumbnail_beside_each_output(
        worker: WorkerProcess, client: Client, input_uri: str) -> None:
    from io import BytesIO

    from PIL import Image

    result = client.submit(_job(input_uri, num_images_per_prompt=2)).wait(timeout=600)
    for output in result.outputs:
        assert output.thumbnail_uri == output.uri.replace(".png", ".thumb.webp")  # type: ignore[union-attr]
        thumb = Image.open(BytesIO(client.download(output.thumbnail_uri)))  # type: ignore[arg-type]
        assert thumb.format == "WEBP" and max(thumb.size) <= 256 and thumb.size == (output.width, output.height)


# -- fleet -------------------------------------------------------------------------
def test_the_fleet_view_lists_the_worker_with_its_resident_model(
        dashboard: DashboardProcess, worker: WorkerProcess, client: Client, admin: Any, input_uri: str,
        shots: Path) -> None:
    from playwright.sync_api import expect

    # given the worker has run a job, so the tiny model is resident
    client.submit(_job(input_uri)).wait(timeout=600)
    # when the fleet page is opened
    _open(admin, dashboard.url + "/fleet")
    # then the worker is listed with its device and the resident model
    card = admin.locator(f'[data-worker="{worker.name}"]')
    expect(card).to_be_visible()
    expect(card.locator(".resident")).to_contain_text("tiny")
    expect(card).to_contain_text("cpu")
    _shot(admin, shots / "dashboard-fleet.png")


# -- cancelling ------------------------------------------------------------------
def test_a_job_cancelled_from_its_page_shows_as_cancelled(
        dashboard: DashboardProcess, worker: WorkerProcess, client: Client, admin: Any, input_uri: str,
        shots: Path) -> None:
    from playwright.sync_api import expect

    # given a long job, open on its page
    handle = client.submit(_job(input_uri, strength=1.0, num_inference_steps=500))
    _open(admin, f"{dashboard.url}/jobs/{handle.job_id}")
    # when the admin presses "Cancel job" and confirms
    admin.once("dialog", lambda dialog: dialog.accept())
    admin.locator("button[data-action=cancel]").click()
    # then the page shows it cancelled, live, and so does the job store
    expect(admin.locator(f'[data-job-status="{handle.job_id}"]')).to_have_text("cancelled")
    expect(admin.locator("#job .error")).to_contain_text("cancelled from the dashboard")
    assert client.status(handle.job_id).status is JobStatus.CANCELLED
    _shot(admin, shots / "dashboard-cancelled.png")


# -- auth ------------------------------------------------------------------------
def test_without_credentials_the_dashboard_refuses(dashboard: DashboardProcess, browser: Any, tmp_path: Path) -> None:
    from playwright.sync_api import Error

    for token in (None, "not-the-token-at-all"):
        page = _page(browser, token)
        try:
            # headless Chromium turns the basic-auth challenge into a failed navigation; either way, no page
            try:
                response = page.goto(dashboard.url + "/jobs")
            except Error as exc:
                assert "ERR_INVALID_AUTH_CREDENTIALS" in str(exc)
            else:
                assert response is not None and response.status == 401
            assert page.locator("body[data-page]").count() == 0
            page.screenshot(path=tmp_path / f"refused-{bool(token)}.png")
        finally:
            page.context.close()
    status, body, headers = _http(dashboard.url + "/jobs")
    assert status == 401 and "Basic" in headers["www-authenticate"] and b"credentials needed" in body
    assert _http(dashboard.url + "/jobs", headers={"Authorization": "Bearer not-the-token-at-all"})[0] == 401
    assert _http(dashboard.url + "/media/x/input")[0] == 401 and _http(dashboard.url + "/events")[0] == 401


def test_actions_need_an_admin_and_the_pages_csrf_token(dashboard: DashboardProcess, client: Client,
                                                        input_uri: str) -> None:
    url = dashboard.url
    assert _http(url + "/healthz")[0] == 200
    assert _http(url + "/fleet", headers={"Authorization": f"Bearer {VIEWER}"})[0] == 200
    # given a queued job nobody runs (its model's queue is the only place it sits: it is only recorded)
    job_id = f"dash-{uuid.uuid4().hex[:8]}"
    from darkroom.common.jobs import validate_job

    client.jobs.create(validate_job({**_job(input_uri), "job_id": job_id, "output_prefix": "s3://darkroom/outputs"}))
    cancel = f"{url}/api/jobs/{job_id}/cancel"
    # then a viewer may not act, an admin's browser credentials alone may not either (no CSRF token),
    assert _http(cancel, "POST", {"Authorization": f"Bearer {VIEWER}"})[0] == 403
    assert _http(cancel, "POST", _basic(ADMIN))[0] == 403
    assert _http(cancel, "POST", {**_basic(ADMIN), "X-Darkroom-CSRF": "forged"})[0] == 403
    assert _http(cancel, "POST", {"Authorization": f"Bearer {ADMIN}", "Origin": "http://evil.example"})[0] == 403
    assert client.status(job_id).status is JobStatus.QUEUED
    # and with the token a page of this dashboard carries, the admin's request goes through
    status, body, _ = _http(url + "/jobs", headers=_basic(ADMIN))
    csrf = body.decode().split('<meta name="csrf" content="', 1)[1].split('"', 1)[0]
    status, body, _ = _http(cancel, "POST", {**_basic(ADMIN), "X-Darkroom-CSRF": csrf})
    assert status == 200 and json.loads(body)["status"] == "cancelled"
    assert client.status(job_id).status is JobStatus.CANCELLED


# -- gallery and quarantine ----------------------------------------------------------
def test_flagged_outputs_are_hidden_from_viewers_and_shown_to_admins(
        dashboard: DashboardProcess, worker: WorkerProcess, client: Client, admin: Any, viewer: Any,
        input_uri: str, shots: Path) -> None:
    from playwright.sync_api import expect

    # given a job whose threshold 0 flags every output (blurred; the original quarantined)
    flagged = client.submit(_job(input_uri, safety_threshold=0.0, seed=3)).wait(timeout=600)
    clean = client.submit(_job(input_uri, seed=4)).wait(timeout=600)
    job_id = flagged.job_id
    # then the viewer's gallery shows the clean output but not the flagged one
    _open(viewer, dashboard.url + "/gallery")
    expect(viewer.locator(f'.tile[data-job="{clean.job_id}"] img')).to_have_attribute("data-loaded", "1")
    hidden = viewer.locator(f'.tile[data-job="{job_id}"]')
    expect(hidden).to_contain_text("flagged")
    assert hidden.locator("img").count() == 0
    _shot(viewer, shots / "dashboard-gallery-viewer.png", clip=GALLERY_CLIP)
    # and the admin's shows it, with its quarantined original on the job page
    _open(admin, dashboard.url + "/gallery")
    expect(admin.locator(f'.tile[data-job="{job_id}"] img')).to_have_attribute("data-loaded", "1")
    _shot(admin, shots / "dashboard-gallery.png", clip=GALLERY_CLIP)
    # and the image routes enforce the same rule
    thumb, original = f"{dashboard.url}/media/{job_id}/out/0/thumb", f"{dashboard.url}/media/{job_id}/out/0/original"
    assert _http(thumb, headers={"Authorization": f"Bearer {VIEWER}"})[0] == 404
    assert _http(original, headers={"Authorization": f"Bearer {VIEWER}"})[0] == 404
    status, data, headers = _http(thumb, headers={"Authorization": f"Bearer {ADMIN}"})
    assert status == 200 and headers["content-type"] == "image/webp" and data[8:12] == b"WEBP"
    status, data, headers = _http(original, headers={"Authorization": f"Bearer {ADMIN}"})
    assert status == 200 and headers["content-type"] == "image/png"


# -- augmentation runs and queues -----------------------------------------------------
def test_augmentation_runs_show_their_progress_live(dashboard: DashboardProcess, settings: Settings, admin: Any,
                                                    shots: Path) -> None:
    from playwright.sync_api import expect

    rdb = redis.Redis.from_url(settings.redis_url.get_secret_value())
    run_id = f"run-{uuid.uuid4().hex[:6]}"
    started = time.time() - 120
    fields = {"total": 200, "done": 60, "failed": 2, "in_flight": 8, "started_at": started, "updated_at": time.time(),
              "output_prefix": "s3://darkroom/augmented/" + run_id, "model": "tiny", "state": "running"}
    try:
        # given a run that a `darkroom augment` producer is writing
        rdb.hset(augment_run_key(run_id), mapping=fields)
        rdb.zadd(AUGMENT_RUNS_KEY, {run_id: started})
        _open(admin, dashboard.url + "/augment")
        row = admin.locator(f'tr[data-run="{run_id}"]')
        expect(row.locator(".done")).to_have_text("60")
        expect(row.locator(".pct")).to_have_text("31%")
        # when it makes progress, then the page follows without a reload
        rdb.hset(augment_run_key(run_id), mapping={"done": 150, "updated_at": time.time()})
        expect(row.locator(".done")).to_have_text("150")
        expect(row.locator(".pct")).to_have_text("76%")
        _shot(admin, shots / "dashboard-augment.png")
    finally:
        rdb.delete(augment_run_key(run_id))
        rdb.zrem(AUGMENT_RUNS_KEY, run_id)
        rdb.close()


def test_the_queue_view_shows_depth_per_model(dashboard: DashboardProcess, worker: WorkerProcess, admin: Any,
                                              shots: Path) -> None:
    from playwright.sync_api import expect

    _open(admin, dashboard.url + "/queues")
    expect(admin.locator('tr[data-queue="darkroom.img2img.cold.tiny"]')).to_be_visible()
    expect(admin.locator('tr[data-queue="darkroom.img2img.hot.tiny"]')).to_be_visible()
    _shot(admin, shots / "dashboard-queues.png")


# -- webhooks ------------------------------------------------------------------------
def test_a_failed_webhook_is_replayed_from_the_dashboard(dashboard: DashboardProcess, settings: Settings,
                                                         admin: Any, shots: Path) -> None:
    from playwright.sync_api import expect

    rdb = redis.Redis.from_url(settings.redis_url.get_secret_value())
    now = datetime.now(UTC)
    event = JobEvent(type=EventType.SUCCEEDED, job_id="dash-hook-job", status=JobStatus.SUCCEEDED, time=now)
    dead = Delivery(id=f"msg_{uuid.uuid4().hex}", job_id="dash-hook-job", url="https://hooks.example.com/darkroom",
                    terminal=True, event=event, attempts=[Attempt(at=now, status=503)], dead_at=now)
    rdb.hset(DEAD_KEY, dead.id, dead.model_dump_json())
    try:
        # given a dead letter, listed on the webhooks page
        _open(admin, dashboard.url + "/webhooks")
        row = admin.locator(f'tr[data-webhook="{dead.id}"]')
        expect(row).to_contain_text("HTTP 503")
        _shot(admin, shots / "dashboard-webhooks.png")
        # when the admin replays it, then it leaves the dead-letter store for the outbox, and the page
        row.locator("button[data-action=replay]").click()
        expect(row).to_have_count(0)
        assert rdb.hget(DEAD_KEY, dead.id) is None
    finally:
        rdb.hdel(DEAD_KEY, dead.id)
        for raw in rdb.lrange("darkroom:webhooks:outbox", 0, -1):
            if dead.id.encode() in raw:
                rdb.lrem("darkroom:webhooks:outbox", 1, raw)
        rdb.close()


# -- the job index and the list's filters ------------------------------------------------
def test_jobs_are_indexed_at_submit_and_the_list_filters_them(dashboard: DashboardProcess, client: Client,
                                                              admin: Any, input_uri: str) -> None:
    from playwright.sync_api import expect

    from darkroom.common.jobs import validate_job

    # given three recorded jobs from two producers (recorded only: no worker takes them)
    since = time.time() - 1
    tag = uuid.uuid4().hex[:6]
    ids = [f"idx-{tag}-{i}" for i in range(3)]
    for i, job_id in enumerate(ids):
        client.jobs.create(validate_job({**_job(input_uri), "job_id": job_id, "producer": f"team-{tag}-{i % 2}",
                                         "output_prefix": "s3://darkroom/outputs"}))
    client.cancel(ids[2])
    # then the index lists them newest first, and records are read in one round trip
    recent = [job_id for job_id, _ in client.jobs.recent(since=since, count=1000) if job_id in ids]
    assert recent == list(reversed(ids))
    assert [r.job_id for r in client.jobs.get_many(ids) if r is not None] == ids
    # and the page filters by producer and status
    _open(admin, f"{dashboard.url}/jobs?producer=team-{tag}-0&since=15m")
    expect(admin.locator("tr[data-job]")).to_have_count(2)
    _open(admin, f"{dashboard.url}/jobs?producer=team-{tag}-0&status=cancelled&model=tiny")
    expect(admin.locator("tr[data-job]")).to_have_count(1)
    expect(admin.locator(f'tr[data-job="{ids[2]}"] [data-job-status]')).to_have_text("cancelled")
