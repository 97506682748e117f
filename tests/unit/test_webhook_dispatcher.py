"""The dispatcher's decisions without a network: payload shape, signing per attempt, retry policy, settings."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from pydantic import ValidationError

from darkroom.common.cli import main
from darkroom.common.errors import ConfigurationError
from darkroom.common.events import EventType, JobEvent
from darkroom.common.reference import settings_markdown
from darkroom.common.settings import Settings
from darkroom.common.status import JobStatus
from darkroom.common.webhooks import CallbackTarget, WebhookVerificationError, generate_secret, verify, webhook_body
from darkroom.producer.webhooks.deliveries import Attempt, Delivery
from darkroom.producer.webhooks.dispatcher import DEFAULT_SCHEDULE, Dispatcher, DispatcherSettings, Response, next_delay

SECRET = generate_secret()


def delivery(type_: EventType = EventType.SUCCEEDED, attempts: int = 0, producer: str | None = "p1") -> Delivery:
    status = JobStatus.STARTED if type_ is EventType.PROGRESS else JobStatus(type_.value)
    event = JobEvent(type=type_, job_id="job-1", status=status, time=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
                     attempt=1, worker="w1", step=3 if type_ is EventType.PROGRESS else None)
    failed = [Attempt(at=datetime.now(UTC), status=500) for _ in range(attempts)]
    return Delivery(id="msg_abc", job_id="job-1", url="https://hooks.example.com/in?token=t", producer=producer,
                    verified_producer=producer,
                    terminal=type_ in {EventType.SUCCEEDED, EventType.FAILED, EventType.CANCELLED},
                    event=event, attempts=failed)


class Recorder:
    """A Sender that answers with fixed statuses and keeps what it was asked to send."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.sent: list[tuple[CallbackTarget, dict[str, str], bytes]] = []

    def post(self, target: CallbackTarget, headers: Mapping[str, str], body: bytes, timeout: float) -> Response:
        self.sent.append((target, dict(headers), body))
        return Response(self.statuses.pop(0) if self.statuses else 200)


def public(host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
    return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port))]


def make(sender: Recorder, resolve: Any = public, **overrides: Any) -> Dispatcher:
    settings = DispatcherSettings(webhook_secrets={"p1": SECRET}, **overrides)
    return Dispatcher(settings, redis.Redis(port=1), sender=sender, resolve=resolve)  # never connects here


def test_the_body_is_type_timestamp_and_data() -> None:
    payload = json.loads(webhook_body(delivery()))
    assert payload["type"] == "job.succeeded"
    assert payload["timestamp"] == "2026-01-02T03:04:05Z"
    assert payload["data"]["job_id"] == "job-1" and payload["data"]["status"] == "succeeded"
    assert payload["data"]["result"] is None and "type" not in payload["data"]
    assert webhook_body(delivery()) == webhook_body(delivery())  # same bytes on every retry


def test_each_attempt_is_signed_with_the_producers_secret_under_the_same_id() -> None:
    sender = Recorder(500, 200)
    dispatcher = make(sender)
    first, second = dispatcher.attempt(delivery()), dispatcher.attempt(delivery(attempts=1))
    assert (first.status, first.ok, second.ok) == (500, False, True)
    assert first.error == "HTTP 500"
    (target, h1, body), (_, h2, _) = sender.sent
    assert h1["webhook-id"] == h2["webhook-id"] == "msg_abc"
    assert target.addresses == ("93.184.216.34",) and target.target == "/in?token=t"
    verify(SECRET, h1, body)
    with pytest.raises(WebhookVerificationError, match="no v1 signature"):
        verify(generate_secret(), h1, body)


def test_a_url_that_now_resolves_to_a_private_address_is_not_contacted() -> None:
    def rebound(host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", port))]

    sender = Recorder()
    attempt = make(sender, resolve=rebound).attempt(delivery())
    assert sender.sent == [] and attempt.status is None
    assert attempt.error is not None and "10.0.0.7 (private)" in attempt.error


def test_a_producer_without_a_secret_is_a_failed_attempt_that_says_what_to_set() -> None:
    sender = Recorder()
    attempt = make(sender).attempt(delivery(producer="unknown"))
    assert sender.sent == [] and attempt.error is not None
    assert "no signing secret for producer 'unknown'" in attempt.error and "DARKROOM_WEBHOOK_SECRETS" in attempt.error


def test_redirects_are_failures_that_name_the_target() -> None:
    text = Response(302, "https://elsewhere.example.com/").describe()
    assert "HTTP 302" in text and "elsewhere.example.com" in text and "not followed" in text


def test_terminal_events_follow_the_whole_schedule() -> None:
    schedule = [0.0, 5.0, 300.0]
    assert next_delay(delivery(attempts=1), schedule, 3) == 5.0
    assert next_delay(delivery(attempts=2), schedule, 3) == 300.0
    assert next_delay(delivery(attempts=3), schedule, 3) is None


def test_lifecycle_events_get_a_few_tries_and_progress_none() -> None:
    assert next_delay(delivery(EventType.STARTED, attempts=1), DEFAULT_SCHEDULE, 2) == 5.0
    assert next_delay(delivery(EventType.STARTED, attempts=2), DEFAULT_SCHEDULE, 2) is None
    assert next_delay(delivery(EventType.PROGRESS, attempts=1), DEFAULT_SCHEDULE, 3) is None


def test_the_default_schedule_spans_at_least_a_day() -> None:
    assert DispatcherSettings().webhook_retry_schedule == DEFAULT_SCHEDULE
    assert sum(DEFAULT_SCHEDULE) >= 24 * 3600 and DEFAULT_SCHEDULE[0] == 0


@pytest.mark.parametrize("schedule", [[], [5.0, 10.0], [0.0, -1.0], [0.0, float("inf")]])
def test_bad_schedules_are_refused(schedule: list[float]) -> None:
    with pytest.raises(ValidationError):
        DispatcherSettings(webhook_retry_schedule=schedule)


def test_secrets_come_from_json_and_never_print(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DARKROOM_WEBHOOK_SECRETS", json.dumps({"p1": SECRET}))
    monkeypatch.setenv("DARKROOM_WEBHOOK_RETRY_SCHEDULE", "[0, 0.5, 2]")
    settings = DispatcherSettings.load()
    assert settings.webhook_secrets["p1"].get_secret_value() == SECRET
    assert settings.webhook_retry_schedule == [0, 0.5, 2]
    assert SECRET not in repr(settings) and SECRET not in settings.model_dump_json()


def test_a_dispatcher_without_valid_secrets_does_not_start() -> None:
    with pytest.raises(ConfigurationError, match="DARKROOM_WEBHOOK_SECRETS"):
        Dispatcher(DispatcherSettings(), redis.Redis(port=1))
    with pytest.raises(ConfigurationError, match=r"\['p2'\] is not 'whsec_'") as failure:
        Dispatcher(DispatcherSettings(webhook_secrets={"p2": "whsec_hunter2!"}), redis.Redis(port=1))
    assert "hunter2" not in str(failure.value)


def test_the_settings_reference_lists_the_dispatcher_settings() -> None:
    reference = (Path(__file__).resolve().parents[2] / "docs" / "reference" / "settings.md").read_text()
    match = re.search(r"<!-- dispatcher-settings:start -->\n(.*?)\n<!-- dispatcher-settings:end -->", reference, re.S)
    assert match, "docs/reference/settings.md has no dispatcher-settings block"
    assert match.group(1) == settings_markdown(DispatcherSettings, skip=Settings), "regenerate with: make docs"


def test_a_receiver_that_is_not_listening_is_a_failed_attempt_naming_the_error() -> None:
    with socket.socket() as probe:  # a port on 127.0.0.1 that nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dispatcher = Dispatcher(
        DispatcherSettings(webhook_secrets={"p1": SECRET}, allow_private_callbacks=True, webhook_timeout_seconds=2),
        redis.Redis(port=1),
    )
    attempt = dispatcher.attempt(delivery().model_copy(update={"url": f"http://127.0.0.1:{port}/hook"}))
    assert attempt.status is None and attempt.error is not None and "ConnectionRefusedError" in attempt.error


def test_cli_dispatcher_without_secrets_says_what_to_set(tmp_path: Path) -> None:
    env = {"DARKROOM_STATE_DIR": str(tmp_path), "DARKROOM_WEBHOOK_SECRETS": "{}"}
    result = CliRunner().invoke(main, ["dispatcher"], env=env)
    assert result.exit_code == 1 and "DARKROOM_WEBHOOK_SECRETS" in result.output
    assert "darkroom webhooks secret" in result.output


def test_cli_secret_and_replay_usage() -> None:
    runner = CliRunner()
    assert runner.invoke(main, ["webhooks", "secret"]).output.startswith("whsec_")
    refused = runner.invoke(main, ["webhooks", "replay"])
    assert refused.exit_code == 2 and "--all" in refused.output


def test_the_jobs_producer_field_chooses_no_secret_only_the_verified_producer_does() -> None:
    # Given an entry whose job names producer p1 but that no worker verified (no registry: one-producer mode)
    sender = Recorder(200)
    claimed = delivery(producer="p1").model_copy(update={"verified_producer": None})
    # When the dispatcher signs it, it signs as its own DARKROOM_PRODUCER_ID, which has no secret here
    attempt = make(sender).attempt(claimed)
    assert attempt.error is not None and "no signing secret for producer 'default'" in attempt.error
    assert sender.sent == []
    # and as p1 once a worker verified p1
    assert make(sender).attempt(delivery(producer="someone-else").model_copy(
        update={"verified_producer": "p1"})).ok
