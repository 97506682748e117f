"""The dashboard's rules that need no running stack: who may do what, which picture a role sees,
settings that refuse unsafe setups, and the thumbnail contract."""

from __future__ import annotations

import base64
import subprocess
import sys
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from darkroom.common.errors import ConfigurationError
from darkroom.common.results import OutputImage
from darkroom.common.safety import SafetyAction, SafetyVerdict
from darkroom.common.storage import output_image_uri, thumbnail_uri
from darkroom.producer.dashboard.auth import Authenticator, Principal, Role
from darkroom.producer.dashboard.media import MediaKind, output_object, picture, sniff_image_type
from darkroom.producer.dashboard.settings import DashboardSettings, is_loopback

ADMIN, VIEWER = "admin-secret-0123", "viewer-secret-0123"


def settings(**values: object) -> DashboardSettings:
    return DashboardSettings(**values)  # type: ignore[arg-type]


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# -- credentials and roles ---------------------------------------------------------------
def test_tokens_give_their_roles_as_bearer_or_as_the_basic_auth_password() -> None:
    auth = Authenticator(settings(dashboard_token=ADMIN, dashboard_viewer_token=VIEWER))
    assert auth.authenticate(f"Bearer {ADMIN}") == Principal(Role.ADMIN, "bearer")
    assert auth.authenticate(f"Bearer {VIEWER}") == Principal(Role.VIEWER, "bearer")
    assert auth.authenticate(basic("anyone", VIEWER)) == Principal(Role.VIEWER, "basic")
    assert auth.authenticate(basic("anyone", ADMIN)) == Principal(Role.ADMIN, "basic")
    for refused in (None, "", "Bearer", f"Bearer {ADMIN}x", basic("a", "wrong-password-1"), "Basic !!!", "Digest x"):
        assert auth.authenticate(refused) is None, refused


def test_basic_auth_user_and_password_make_an_admin() -> None:
    auth = Authenticator(settings(dashboard_user="ops", dashboard_password="a-long-password"))
    assert auth.authenticate(basic("ops", "a-long-password")) == Principal(Role.ADMIN, "basic")
    assert auth.authenticate(basic("someone", "a-long-password")) is None
    assert auth.authenticate(basic("ops", "another-password")) is None


def test_without_credentials_only_loopback_hosts_get_in() -> None:
    auth = Authenticator(settings())
    assert auth.open
    for host in ("127.0.0.1:8090", "localhost:8090", "[::1]:8090", "localhost"):
        assert auth.authenticate(None, host) == Principal(Role.ADMIN, "open"), host
    for host in (None, "", "attacker.example:8090", "10.0.0.5:8090", "127.0.0.1.nip.io:8090"):
        assert auth.authenticate(None, host) is None, host


def test_actions_need_an_admin_the_pages_csrf_token_and_the_same_origin() -> None:
    auth = Authenticator(settings(dashboard_token=ADMIN, dashboard_viewer_token=VIEWER))
    admin_browser, viewer = Principal(Role.ADMIN, "basic"), Principal(Role.VIEWER, "basic")
    token = auth.csrf_token(admin_browser)
    host = "127.0.0.1:8090"
    assert auth.may_act(admin_browser, token, None, host)
    assert auth.may_act(admin_browser, token, "http://127.0.0.1:8090", host)
    assert not auth.may_act(admin_browser, None, None, host)  # credentials a browser resends on its own
    assert not auth.may_act(admin_browser, "0" * 64, None, host)
    assert not auth.may_act(admin_browser, token, "http://evil.example", host)
    assert not auth.may_act(viewer, auth.csrf_token(viewer), None, host)
    assert auth.may_act(Principal(Role.ADMIN, "bearer"), None, None, host)  # a script's own header
    assert token != Authenticator(settings(dashboard_token=ADMIN)).csrf_token(admin_browser)  # per process


# -- settings ------------------------------------------------------------------------
def test_no_credentials_refuses_a_non_loopback_address() -> None:
    settings(dashboard_host="127.0.0.1").check_binding()
    settings(dashboard_host="::1").check_binding()
    with pytest.raises(ConfigurationError, match="refusing to listen on 0.0.0.0 without credentials"):
        settings(dashboard_host="0.0.0.0").check_binding()
    settings(dashboard_host="0.0.0.0", dashboard_token=ADMIN).check_binding()
    assert is_loopback("localhost") and is_loopback("127.0.0.2") and not is_loopback("dashboard.internal")


def test_weak_or_incomplete_credentials_are_refused() -> None:
    with pytest.raises(ValidationError, match="at least 12 characters"):
        settings(dashboard_token="short")
    with pytest.raises(ValidationError, match="together"):
        settings(dashboard_user="ops")
    with pytest.raises(ValidationError, match="must differ"):
        settings(dashboard_token=ADMIN, dashboard_viewer_token=ADMIN)


def test_secrets_never_print() -> None:
    shown = repr(settings(dashboard_token=ADMIN, dashboard_viewer_token=VIEWER, dashboard_user="ops",
                          dashboard_password="a-long-password"))
    assert ADMIN not in shown and VIEWER not in shown and "a-long-password" not in shown


# -- pictures and roles ----------------------------------------------------------------
def verdict(action: SafetyAction) -> SafetyVerdict:
    flagged = action is not SafetyAction.NONE
    return SafetyVerdict(checker="opennsfw", version="1", score=0.9 if flagged else 0.1, threshold=0.5,
                         flagged=flagged, action=action)


def output(action: SafetyAction) -> OutputImage:
    blocked = action is SafetyAction.BLOCKED
    public = None if blocked else str(output_image_uri("s3://out", "j", 0, "png"))
    return OutputImage(index=0, uri=public, seed=1, width=64, height=64, content_type="image/png",
                       nsfw=action is not SafetyAction.NONE, safety=verdict(action),
                       quarantine_uri="s3://q/j/000.png" if action.quarantines else None,
                       thumbnail_uri=None if blocked else str(thumbnail_uri("s3://out", "j", 0)))


def test_viewers_see_unflagged_outputs_only_and_admins_see_quarantined_originals() -> None:
    clean, blurred, blocked = output(SafetyAction.NONE), output(SafetyAction.BLURRED), output(SafetyAction.BLOCKED)
    assert output_object(clean, MediaKind.THUMB, Role.VIEWER) == "s3://out/j/000.thumb.webp"
    assert output_object(clean, MediaKind.IMAGE, Role.VIEWER) == "s3://out/j/000.png"
    for kind in MediaKind:
        assert output_object(blurred, kind, Role.VIEWER) is None
        assert output_object(blocked, kind, Role.VIEWER) is None
    assert output_object(blurred, MediaKind.THUMB, Role.ADMIN) == "s3://out/j/000.thumb.webp"
    assert output_object(blurred, MediaKind.ORIGINAL, Role.ADMIN) == "s3://q/j/000.png"
    assert output_object(blocked, MediaKind.THUMB, Role.ADMIN) is None
    assert picture("j", blurred, Role.VIEWER).hidden == "flagged"
    assert picture("j", blocked, Role.ADMIN).hidden == "blocked"
    assert picture("j", clean, Role.VIEWER).thumb_url == "/media/j/out/0/thumb"


def test_only_raster_images_are_served() -> None:
    assert sniff_image_type(b"\x89PNG\r\n\x1a\n....") == "image/png"
    assert sniff_image_type(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert sniff_image_type(b"\xff\xd8\xff\xe0") == "image/jpeg"
    assert sniff_image_type(b"<svg xmlns='http://www.w3.org/2000/svg'/>") is None
    assert sniff_image_type(b"<html><script>") is None


# -- the thumbnail contract ------------------------------------------------------------
def test_thumbnail_layout_and_record() -> None:
    assert str(thumbnail_uri("s3://out/runs/", "job1", 2)) == "s3://out/runs/job1/002.thumb.webp"
    with pytest.raises(ValidationError, match="without a public image"):
        OutputImage(index=0, uri=None, seed=1, width=8, height=8, content_type="image/png", nsfw=True,
                    safety=verdict(SafetyAction.BLOCKED), quarantine_uri="s3://q/j/000.png",
                    thumbnail_uri="s3://out/j/000.thumb.webp")


def test_make_thumbnail_is_a_webp_with_the_longest_side_at_most_256() -> None:
    from io import BytesIO

    from PIL import Image

    from darkroom.worker.thumbnails import make_thumbnail

    wide = Image.open(BytesIO(make_thumbnail(Image.new("RGB", (1024, 512), (200, 10, 10)))))
    assert wide.format == "WEBP" and wide.size == (256, 128)
    small = Image.open(BytesIO(make_thumbnail(Image.new("RGBA", (64, 48)))))
    assert small.size == (64, 48) and small.mode == "RGB"  # never enlarged; alpha dropped
    with pytest.raises(ValueError, match="at least 1 pixel"):
        make_thumbnail(Image.new("RGB", (8, 8)), side=0)


# -- packaging ----------------------------------------------------------------------------
def test_the_dashboard_imports_without_torch_and_renders_its_templates() -> None:
    code = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "diffusers", "transformers", "numpy", "PIL"}:
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Block())
from darkroom.producer.dashboard.app import HERE, Dashboard
from darkroom.producer.dashboard.settings import DashboardSettings
names = sorted(p.name for p in (HERE / "templates").glob("*.html"))
board = Dashboard(DashboardSettings(dashboard_token="x" * 12), client=object(), store=object())
for name in names:
    board.templates.get_template(name)
print(len(names))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 8


def test_relative_times_and_sizes_read_well() -> None:
    from darkroom.producer.dashboard.app import _ago, _seconds, _size, _when

    now = 1_000_000.0
    assert _ago(now - 5, now) == "5 s ago" and _ago(now - 600, now) == "10 min ago" and _ago(None) == "-"
    assert _seconds(0.25) == "250 ms" and _seconds(3.5) == "3.50 s"
    assert _size(8 * 2**20) == "8.0 MiB" and _size(None) == "-"
    assert _when("2026-11-28T19:00:00+00:00") == "2026-11-28 19:00:00 UTC"
    assert _when(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2026-01-02 03:04:05 UTC"


def test_the_docs_list_the_dashboard_settings_and_show_its_screenshots() -> None:
    import re
    from pathlib import Path

    from darkroom.common.reference import settings_markdown
    from darkroom.common.settings import Settings

    docs = Path(__file__).resolve().parents[2] / "docs"
    reference = (docs / "reference" / "settings.md").read_text()
    block = re.search(r"<!-- dashboard-settings:start -->\n(.*?)\n<!-- dashboard-settings:end -->", reference, re.S)
    assert block and block.group(1) == settings_markdown(DashboardSettings, skip=Settings), "run: make docs"
    images = re.findall(r"\(\.\./images/(dashboard-[\w-]+\.png)\)", (docs / "guides" / "dashboard.md").read_text())
    assert len(images) >= 8
    for image in images:
        path = Path(__file__).resolve().parents[2] / "docs" / "images" / image
        assert path.is_file() and path.stat().st_size < 300_000, image
