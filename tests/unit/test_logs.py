from __future__ import annotations

import io
import json
import logging

import pytest

from darkroom.common.logs import configure_logging, job_context


@pytest.fixture(autouse=True)
def restore_root_logger() -> object:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    yield
    root.handlers[:], _ = saved[0], root.setLevel(saved[1])


def test_json_lines_carry_the_process_and_the_job() -> None:
    configure_logging("INFO", "json", "worker-7")
    stream = io.StringIO()
    handler = logging.getLogger().handlers[0]
    handler.stream = stream  # type: ignore[attr-defined]
    log = logging.getLogger("darkroom.test")
    with job_context("job-42"):
        log.info("started %s", "x")
    log.warning("between jobs")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first == {**first, "message": "started x", "process": "worker-7", "job_id": "job-42", "level": "INFO"}
    assert second["job_id"] is None and second["process"] == "worker-7"


def test_text_lines_name_the_job_too() -> None:
    configure_logging("INFO", "text", "dispatcher-1")
    stream = io.StringIO()
    logging.getLogger().handlers[0].stream = stream  # type: ignore[attr-defined]
    with job_context("abc"):
        logging.getLogger("x").info("hello")
    assert "dispatcher-1 job=abc x: hello" in stream.getvalue()
