"""Secrets in callback URLs stay out of what others read: result.json parameters, webhook bodies and
dashboard pages show the URL without its userinfo, query or fragment."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from darkroom.common.events import EventType, JobEvent
from darkroom.common.jobs import Img2ImgJob
from darkroom.common.jobstore import JobRecord
from darkroom.common.redaction import redact_parameters, redact_url
from darkroom.common.results import JobResult, Timings
from darkroom.common.status import JobStatus
from darkroom.common.webhooks import OutboxEntry, webhook_body
from darkroom.producer.dashboard.views import JobDetail

TOKEN_URL = "https://hook-user:pa55word@hooks.example.com:8443/in/cb?token=s3cr3t&x=1#frag"
NOW = datetime(2026, 12, 1, tzinfo=UTC)


@pytest.mark.parametrize(("url", "shown"), [
    (TOKEN_URL, "https://redacted@hooks.example.com:8443/in/cb?redacted#redacted"),
    ("https://hooks.example.com/in?token=s3cr3t", "https://hooks.example.com/in?redacted"),
    ("https://hooks.example.com/in", "https://hooks.example.com/in"),
    ("http://[::1]:9000/x?k=v", "http://[::1]:9000/x?redacted"),
    ("https://user@hooks.example.com/", "https://redacted@hooks.example.com/"),
    ("https://hooks.example.com:notaport/?t=1", "redacted"),
])
def test_urls_lose_userinfo_query_and_fragment(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_only_url_fields_are_redacted() -> None:
    params = {"callback_url": TOKEN_URL, "prompt": "a cat?token=not-a-url-field", "strength": 0.5}
    assert redact_parameters(params) == {**params, "callback_url": redact_url(TOKEN_URL)}


def _job() -> Img2ImgJob:
    return Img2ImgJob(job_id="job-1", model="tiny", image="s3://darkroom/in/a.png", prompt="a cat",
                      callback_url=TOKEN_URL, output_prefix="s3://darkroom/outputs")


def _result(parameters: dict[str, object]) -> JobResult:
    return JobResult(job_id="job-1", model="tiny", outputs=[], result_uri="s3://darkroom/outputs/job-1/result.json",
                     parameters=parameters, timings=Timings(), worker="w", device="cpu", attempt=1,
                     finished_at=NOW)


def test_a_webhook_body_never_carries_the_token_even_from_an_older_workers_result() -> None:
    stored = _result(_job().model_dump(mode="json"))  # as a worker before redaction wrote it
    entry = OutboxEntry(id="msg_1", job_id="job-1", url=TOKEN_URL, terminal=True, result=stored,
                        event=JobEvent(type=EventType.SUCCEEDED, job_id="job-1", status=JobStatus.SUCCEEDED,
                                       time=NOW))
    body = webhook_body(entry).decode()
    assert "s3cr3t" not in body and "pa55word" not in body
    assert json.loads(body)["data"]["result"]["parameters"]["callback_url"] == redact_url(TOKEN_URL)
    assert entry.url == TOKEN_URL  # the dispatcher still has what it needs


def test_the_dashboard_shows_parameters_redacted_before_and_after_the_result() -> None:
    record = JobRecord(job_id="job-1", status=JobStatus.QUEUED, job=_job(), created_at=NOW, updated_at=NOW)
    finished = record.model_copy(update={"status": JobStatus.SUCCEEDED,
                                         "result": _result(_job().model_dump(mode="json"))})
    for shown in (record, finished):
        detail = JobDetail(shown, [], None, [], True, [])
        assert detail.parameters["callback_url"] == redact_url(TOKEN_URL)
        assert "s3cr3t" not in json.dumps(detail.parameters)


def test_a_refused_callback_url_is_shown_redacted_in_the_field_error() -> None:
    """A worker stores a refused message's errors in the job's record, which webhooks and pages show."""
    from darkroom.common.errors import InvalidJobError
    from darkroom.common.jobs import validate_job

    with pytest.raises(InvalidJobError) as refused:
        validate_job({"model": "tiny", "image": "s3://darkroom/in/a.png", "prompt": "x",
                      "callback_url": "ftp://hooks.example.com/in?token=s3cr3t"})
    assert "s3cr3t" not in str(refused.value) and refused.value.errors[0].field == "callback_url"
