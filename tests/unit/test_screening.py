"""The worker's safety stage (darkroom.worker.screening) and the safety records in the contract:
per-job rules within the operator's limits, the input precheck with the REAL open_nsfw classifier,
the quarantine prefix kept out of jobs' reach, and verdicts in results, failures and webhooks."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from darkroom.common.errors import ConfigurationError, ErrorCode, JobError, JobFailed
from darkroom.common.events import EventType, JobEvent
from darkroom.common.jobs import Img2ImgJob
from darkroom.common.jobstore import JobRecord
from darkroom.common.results import FailureDetails, JobResult, OutputImage, Timings
from darkroom.common.safety import SafetyAction, SafetyPolicy, SafetyVerdict
from darkroom.common.status import JobStatus
from darkroom.common.webhooks import OutboxEntry, outbox_push, webhook_body
from darkroom.dev.demo import sample_image
from darkroom.worker.registry import ModelRegistry
from darkroom.worker.safety import NoChecker, OpenNSFWChecker
from darkroom.worker.screening import InputFlaggedError, Screening
from darkroom.worker.settings import WorkerSettings

JOB = {"job_id": "job-1", "model": "tiny", "image": "s3://darkroom/inputs/a.png", "prompt": "a cat",
       "output_prefix": "s3://darkroom/outputs"}


def job(**fields: Any) -> Img2ImgJob:
    return Img2ImgJob.model_validate({**JOB, **fields})


@pytest.fixture(scope="module")
def opennsfw() -> OpenNSFWChecker:
    return OpenNSFWChecker(threads=1)


def refusal(screening: Screening, **fields: Any) -> JobError:
    with pytest.raises(JobError) as caught:
        screening.rules(job(**fields))
    assert caught.value.code is ErrorCode.INVALID_JOB
    return caught.value


# -- per-job rules ---------------------------------------------------------------------
def test_a_job_without_safety_fields_gets_the_workers_defaults() -> None:
    rules = Screening(NoChecker(), threshold=0.4, policy=SafetyPolicy.BLOCK).rules(job())
    assert (rules.threshold, rules.policy, rules.precheck) == (0.4, SafetyPolicy.BLOCK, False)


def test_jobs_may_be_stricter_than_the_default_but_not_laxer_unless_the_operator_allows() -> None:
    default_limits = Screening(NoChecker(), threshold=0.5)
    assert default_limits.rules(job(safety_threshold=0.0, safety_policy="flag")).threshold == 0.0
    error = refusal(default_limits, safety_threshold=0.9)
    assert "safety_threshold=0.9" in error.message and "0.0 <= safety_threshold <= 0.5" in error.message
    widened = Screening(NoChecker(), threshold=0.5, threshold_min=0.2, threshold_max=1.0)
    assert widened.rules(job(safety_threshold=1.0)).threshold == 1.0
    assert "0.2 <= safety_threshold <= 1.0" in refusal(widened, safety_threshold=0.1).message


@pytest.mark.parametrize(("threshold", "low", "high", "prefix", "says"), [
    (0.8, 0.0, 0.6, "s3://darkroom/quarantine", "default 0.8 is outside the limits [0.0, 0.6]"),
    (0.5, 0.6, 1.0, "s3://darkroom/quarantine", "default 0.5 is outside the limits [0.6, 1.0]"),
    (0.5, 0.0, None, "/tmp/quarantine", "DARKROOM_QUARANTINE_PREFIX='/tmp/quarantine'"),
])
def test_inconsistent_operator_settings_refuse_to_start(threshold: float, low: float, high: float | None,
                                                        prefix: str, says: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(says)):
        Screening(NoChecker(), threshold=threshold, threshold_min=low, threshold_max=high, quarantine_prefix=prefix)


def test_precheck_needs_a_checker() -> None:
    error = refusal(Screening(NoChecker()), precheck_input=True)
    assert "needs a safety checker" in error.message and "DARKROOM_SAFETY_CHECKER=none" in error.message


@pytest.mark.parametrize(("field", "value"), [
    ("output_prefix", "s3://darkroom/quarantine"),
    ("output_prefix", "s3://darkroom/quarantine/mine"),
    ("image", "s3://darkroom/quarantine/job-0/000.png"),
])
def test_jobs_never_read_or_write_under_the_quarantine_prefix(field: str, value: str) -> None:
    error = refusal(Screening(NoChecker()), **{field: value})
    assert "quarantine prefix s3://darkroom/quarantine" in error.message


def test_a_neighbouring_prefix_is_not_the_quarantine() -> None:
    rules = Screening(NoChecker()).rules(job(output_prefix="s3://darkroom/quarantine-reports"))
    assert rules.threshold == 0.5


def test_quarantine_keys_mirror_the_output_layout() -> None:
    screening = Screening(NoChecker(), quarantine_prefix="s3://vault/held/")
    assert str(screening.quarantine_uri("job-1", 2, "png")) == "s3://vault/held/job-1/002.png"


# -- the input precheck, with the real classifier ------------------------------------------
def test_precheck_stops_a_flagged_input_and_passes_an_unflagged_one(opennsfw: OpenNSFWChecker) -> None:
    screening = Screening(opennsfw, threshold=0.5, threshold_max=1.0)
    image = sample_image(64)
    with pytest.raises(InputFlaggedError) as caught:
        screening.check_input(image, screening.rules(job(safety_threshold=0.0, precheck_input=True)))
    assert caught.value.code is ErrorCode.INPUT_FLAGGED
    verdict = caught.value.verdict
    assert verdict.flagged and verdict.action is SafetyAction.BLOCKED and verdict.checker == "opennsfw"
    assert verdict.score is not None and 0.0 <= verdict.score <= 1.0
    assert "no denoising was run" in caught.value.message and "threshold 0.0" in caught.value.message
    passed = screening.check_input(image, screening.rules(job(safety_threshold=1.0, precheck_input=True)))
    assert passed.flagged is False and passed.score == verdict.score


def test_judge_applies_the_jobs_policy(opennsfw: OpenNSFWChecker) -> None:
    screening = Screening(opennsfw, threshold_max=1.0)
    images = [sample_image(64), sample_image(96)]
    verdicts = screening.judge(images, screening.rules(job(safety_threshold=0.0, safety_policy="block")))
    assert [v.action for v in verdicts] == [SafetyAction.BLOCKED] * 2
    assert [v.action for v in screening.judge(images, screening.rules(job()))] == [SafetyAction.NONE] * 2


def test_from_settings_builds_the_named_checker_and_checks_limits_before_loading_it(tiny_model: Path) -> None:
    registry = ModelRegistry.build(None, [f"tiny={tiny_model}"], {})
    assert isinstance(Screening.from_settings(WorkerSettings(safety_checker="none"), registry).checker, NoChecker)
    with pytest.raises(ConfigurationError, match="none of tiny does"):  # the tiny model has no safety_checker/
        Screening.from_settings(WorkerSettings(safety_checker="diffusers"), registry)
    with pytest.raises(ConfigurationError, match="outside the limits"):
        Screening.from_settings(WorkerSettings(safety_checker="diffusers", safety_threshold_min=0.7), registry)


def test_the_worker_command_refuses_inconsistent_limits_with_a_clear_message(tiny_model: Path,
                                                                              tmp_path: Path) -> None:
    from darkroom.worker.cli import worker

    env = {"DARKROOM_SAFETY_THRESHOLD": "0.8", "DARKROOM_SAFETY_THRESHOLD_MAX": "0.6",
           "DARKROOM_STATE_DIR": str(tmp_path), "DARKROOM_DEVICE": "cpu"}
    outcome = CliRunner().invoke(worker, ["--model", f"tiny={tiny_model}", "--no-preload"], env=env)
    assert outcome.exit_code == 1
    assert "safety threshold default 0.8 is outside the limits [0.0, 0.6]" in outcome.output


# -- verdicts in results, failures and webhooks ------------------------------------------------
def verdict(action: SafetyAction = SafetyAction.NONE) -> SafetyVerdict:
    flagged = action is not SafetyAction.NONE
    return SafetyVerdict(checker="opennsfw", version="0.1.0+sha256.x", score=0.25, threshold=0.0 if flagged else 0.5,
                         flagged=flagged, action=action)


def output(index: int, action: SafetyAction) -> OutputImage:
    v = verdict(action)
    return OutputImage(index=index, uri=None if action is SafetyAction.BLOCKED else f"s3://b/o/{index:03d}.png",
                       seed=index, width=8, height=8, content_type="image/png", nsfw=v.flagged, safety=v,
                       quarantine_uri=f"s3://b/q/{index:03d}.png" if action.quarantines else None)


def test_output_records_must_agree_with_their_verdict() -> None:
    for action in SafetyAction:
        assert output(0, action).safety is not None
    with pytest.raises(ValueError, match="contradicts safety action 'blocked'"):
        OutputImage(index=0, uri="s3://b/o/000.png", seed=0, width=8, height=8, content_type="image/png",
                    nsfw=True, safety=verdict(SafetyAction.BLOCKED), quarantine_uri="s3://b/q/000.png")
    with pytest.raises(ValueError, match="quarantine_uri"):
        OutputImage(index=0, uri="s3://b/o/000.png", seed=0, width=8, height=8, content_type="image/png",
                    nsfw=True, safety=verdict(SafetyAction.BLURRED))
    with pytest.raises(ValueError, match="nsfw=False contradicts"):
        OutputImage(index=0, uri="s3://b/o/000.png", seed=0, width=8, height=8, content_type="image/png",
                    nsfw=False, safety=verdict(SafetyAction.FLAGGED))


def result_with(*actions: SafetyAction) -> JobResult:
    return JobResult(job_id="job-1", model="tiny", outputs=[output(i, a) for i, a in enumerate(actions)],
                     result_uri="s3://b/o/result.json", parameters={}, timings=Timings(), worker="w", device="cpu",
                     attempt=1, finished_at=datetime(2026, 1, 1, tzinfo=UTC))


def test_blocked_images_have_no_public_uri() -> None:
    result = result_with(SafetyAction.NONE, SafetyAction.BLOCKED, SafetyAction.BLURRED)
    assert result.uris == ["s3://b/o/000.png", "s3://b/o/002.png"]
    assert result.nsfw_content_detected == [False, True, True]


class _Pipe:
    def __init__(self) -> None:
        self.pushed: list[str] = []

    def lpush(self, _key: str, value: str) -> None:
        self.pushed.append(value)


def record(status: JobStatus, **fields: Any) -> JobRecord:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    return JobRecord(job_id="job-1", status=status, job=job(callback_url="https://hooks.example.com/in"),
                     created_at=now, updated_at=now, **fields)


def webhook_data(rec: JobRecord, type_: EventType) -> dict[str, Any]:
    pipe = _Pipe()
    event = JobEvent(type=type_, job_id="job-1", status=rec.status, time=rec.updated_at, attempt=1,
                     error_code=rec.error_code, error_message=rec.error_message)
    outbox_push(pipe, rec, event)
    data: dict[str, Any] = json.loads(webhook_body(OutboxEntry.model_validate_json(pipe.pushed[0])))["data"]
    return data


def test_webhooks_carry_output_verdicts_and_the_input_verdict_of_a_failure() -> None:
    succeeded = webhook_data(record(JobStatus.SUCCEEDED, result=result_with(SafetyAction.BLURRED)),
                             EventType.SUCCEEDED)
    assert succeeded["result"]["outputs"][0]["safety"]["action"] == "blurred"
    assert succeeded["result"]["outputs"][0]["nsfw"] is True and succeeded["details"] is None
    details = FailureDetails(timings=Timings(decode=0.01, safety=0.2), input_safety=verdict(SafetyAction.BLOCKED))
    failed = record(JobStatus.FAILED, error_code="input_flagged", error_message="flagged", details=details)
    data = webhook_data(failed, EventType.FAILED)
    assert data["error_code"] == "input_flagged" and data["result"] is None
    assert data["details"]["input_safety"]["flagged"] is True and data["details"]["timings"]["inference"] == 0.0
    # ...and the SDK's JobFailed carries the same details
    with pytest.raises(JobFailed) as caught:
        failed.raise_for_outcome()
    assert caught.value.details == details.model_dump(mode="json")
