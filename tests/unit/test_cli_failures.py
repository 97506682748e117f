"""Expected conditions end a `darkroom` command with one line and a documented exit code, never a
traceback. These run the real command line in a subprocess, with no services running."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from darkroom.common.errors import ErrorCode, FieldError, JobError

DARKROOM = str(Path(sys.executable).with_name("darkroom"))


def run(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DARKROOM_")}
    return subprocess.run([DARKROOM, *args], cwd=cwd, env={**clean, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the socket goes


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_no_services_and_no_settings_here_says_where_it_looked_and_how_to_start(tmp_path: Path) -> None:
    # Given a folder with no .darkroom and no DARKROOM_* variables (so the default 127.0.0.1:6379)
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 6379)) == 0:
            pytest.fail("something listens on 127.0.0.1:6379 (the default address this test needs unused): stop it")
    # When a command needs Redis
    result = run("status", "some-job", cwd=tmp_path)
    # Then it exits 69 with one line naming the settings it looked for and the way to start services
    assert result.returncode == 69
    line = one_line(result)
    assert str(tmp_path / ".darkroom" / "services.env") in line and "darkroom services up" in line


def test_services_stopped_names_the_settings_file_it_used(tmp_path: Path) -> None:
    # Given a services.env from an earlier `services up` whose Redis is gone
    state = tmp_path / ".darkroom"
    state.mkdir()
    (state / "services.env").write_text(f"DARKROOM_REDIS_URL=redis://127.0.0.1:{closed_port()}/0\n")
    for args in (["status", "job"], ["wait", "job"], ["workers"], ["submit", "--model", "m", "--image",
                                                                   "s3://bkt/a.png", "--prompt", "x"]):
        result = run(*args, cwd=tmp_path)
        assert result.returncode == 69, (args, result.stderr)
        assert f"settings from {state / 'services.env'}" in one_line(result)


def test_upload_without_credentials_says_why(tmp_path: Path) -> None:
    picture = tmp_path / "a.png"
    picture.write_bytes(b"\x89PNG")
    env = {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none"),
           "AWS_EC2_METADATA_DISABLED": "true"}
    result = run("upload", str(picture), "s3://darkroom/inputs/", cwd=tmp_path, env=env)
    assert result.returncode == 77
    assert "no S3 credentials" in one_line(result)


@pytest.mark.parametrize("spelling", ["--log-level=warning", "--loglevel=WARNING"])
def test_worker_without_services_fails_before_loading_models(tmp_path: Path, tiny_model: Path, spelling: str) -> None:
    result = run("worker", "--model", f"tiny={tiny_model}", spelling, cwd=tmp_path,
                 env={"DARKROOM_REDIS_URL": f"redis://127.0.0.1:{closed_port()}/0"})
    assert result.returncode == 69
    assert "cannot reach Redis" in one_line(result)


def test_a_huge_refused_value_is_cut_to_80_characters_and_its_length(tmp_path: Path) -> None:
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"model": "m", "image": "s3://bkt/a.png", "prompt": "x" * 1_000_000, "strength": 7}))
    result = run("submit", "--job", str(job), cwd=tmp_path)
    assert result.returncode == 1
    line = one_line(result)
    assert len(line) < 600 and "(1,000,000 characters)" in line and "strength=7" in line


def test_field_error_cuts_long_values() -> None:
    error = FieldError("prompt", "y" * 5000, "too long")
    assert str(error) == f"prompt='{'y' * 79}... (5,000 characters): too long"
    assert str(FieldError("strength", 1.5, "too big")) == "strength=1.5: too big"


def test_job_error_messages_carry_no_object_addresses() -> None:
    error = JobError(ErrorCode.INPUT_UNREADABLE,
                     "input is not a readable image: cannot identify image file <_io.BytesIO object at 0x7f3a2c1b9e90>")
    assert error.message == "input is not a readable image: cannot identify image file"
    assert "0x" not in str(error)


def test_every_command_documents_its_exit_codes(tmp_path: Path) -> None:
    for command in (["submit"], ["status"], ["wait"], ["watch"], ["cancel"], ["upload"], ["download"],
                    ["workers"], ["worker"], ["services", "status"], ["services", "up"], ["services", "down"],
                    ["augment"], ["dispatcher"], ["webhooks", "list-failed"], ["webhooks", "replay"],
                    ["webhooks", "secret"], ["dashboard"], ["demo"], ["models", "make-tiny"], ["models", "push"]):
        result = run(*command, "--help", cwd=tmp_path)
        assert result.returncode == 0 and "Exit codes:" in result.stdout, command


def test_worker_takes_log_level_and_hides_the_old_spelling(tmp_path: Path) -> None:
    text = run("worker", "--help", cwd=tmp_path).stdout
    assert "--log-level" in text and "--loglevel" not in text
