"""No way across: one parser for every s3:// reference, one policy (bucket allowlist, quarantine) for
every field that names one, applied at submit, by the worker and by the dashboard; ids full-matched."""

from __future__ import annotations

import json
import re
import string
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from darkroom.common.boundaries import ReferencePolicy, job_references
from darkroom.common.errors import ErrorCode, InvalidJobError, JobError
from darkroom.common.jobs import Img2ImgJob, validate_job
from darkroom.common.jobstore import JobRecord
from darkroom.common.settings import Settings
from darkroom.common.status import JobStatus
from darkroom.common.storage import URI_ALLOWED, InvalidUri, S3Uri
from darkroom.producer._submission import prepare
from darkroom.producer.dashboard.auth import Role
from darkroom.producer.dashboard.media import input_object
from darkroom.worker.safety import NoChecker
from darkroom.worker.screening import Screening

JOB: dict[str, Any] = {"job_id": "job-1", "model": "tiny", "image": "s3://darkroom/inputs/a.png", "prompt": "a cat",
                       "output_prefix": "s3://darkroom/outputs"}
EMB = "s3://darkroom/emb/e.safetensors"
QUARANTINE = "s3://darkroom/quarantine"

# Every field that names an object, and a job dict that puts `uri` in it.
REFERENCES: dict[str, Any] = {
    "image": lambda uri: {"image": uri},
    "ip_adapter_image": lambda uri: {"ip_adapter_image": uri},
    "prompt_embeds": lambda uri: {"prompt": None, "prompt_embeds": uri},
    "negative_prompt_embeds": lambda uri: {"prompt": None, "prompt_embeds": EMB, "negative_prompt_embeds": uri},
    "adapters.0.uri": lambda uri: {"adapters": [{"uri": uri}]},
    "textual_inversions.0.uri": lambda uri: {"textual_inversions": [{"uri": uri, "token": "<t>"}]},
    "output_prefix": lambda uri: {"output_prefix": uri.rsplit("/", 1)[0]},
}


def job(**fields: Any) -> Img2ImgJob:
    return Img2ImgJob.model_validate({**JOB, **fields})


def job_with(field: str, uri: str) -> dict[str, Any]:
    return {k: v for k, v in {**JOB, **REFERENCES[field](uri)}.items() if v is not None}


# -- the parser ----------------------------------------------------------------------------
@pytest.mark.parametrize(("uri", "says"), [
    ("s3://darkroom//quarantine/victim/000.png", "starts with ./."),
    ("s3://darkroom/a//b.png", "empty segment"),
    ("s3://darkroom/a/./b.png", "'.' segment"),
    ("s3://darkroom/a/../quarantine/b.png", "'..' segment"),
    ("s3://darkroom/..", "'..' segment"),
    ("s3://darkroom/a.png\n", "control character"),
    ("s3://darkroom/a\x00.png", "control character or NUL"),
    ("s3://darkroom/a\x85.png", "control character"),
    ("s3://darkroom/", "no object key"),
    ("s3://Dark_Room/a.png", "not a valid S3 bucket name"),
    ("s3://darkroom\n/a.png", "not a valid S3 bucket name"),
    ("https://darkroom/a.png", "must be an s3:// URI"),
    ("s3://darkroom/" + "k" * 1100, "at most 1024"),
])
def test_the_parser_refuses_keys_object_stores_read_differently(uri: str, says: str) -> None:
    with pytest.raises(InvalidUri, match=says) as refused:
        S3Uri.parse(uri)
    assert refused.value.allowed == URI_ALLOWED


def test_prefixes_may_be_a_bucket_or_end_in_one_slash_and_nothing_more() -> None:
    assert S3Uri.parse("s3://darkroom", allow_empty_key=True).key == ""
    assert S3Uri.parse("s3://darkroom/", allow_empty_key=True).key == ""
    assert S3Uri.parse("s3://darkroom/out/", allow_empty_key=True).key == "out/"
    for bad in ("s3://darkroom//", "s3://darkroom/out//", "s3://darkroom//out"):
        with pytest.raises(InvalidUri):
            S3Uri.parse(bad, allow_empty_key=True)


def test_join_refuses_parts_that_climb_or_fold() -> None:
    root = S3Uri.parse("s3://darkroom/runs")
    assert str(root.join("a/b.png")) == "s3://darkroom/runs/a/b.png"
    for part in ("../quarantine/x.png", "a//b.png", "./x", "x\n"):
        with pytest.raises(InvalidUri):
            root.join(part)


@pytest.mark.parametrize("field", list(REFERENCES))
def test_every_reference_field_refuses_a_bad_key_at_submit_with_field_value_and_allowed(field: str) -> None:
    bad = "s3://darkroom//quarantine/" + "v" * 120 + "/000.safetensors"
    with pytest.raises(InvalidJobError) as refused:
        validate_job(job_with(field, bad))
    error = next(e for e in refused.value.errors if e.field == field)
    assert "starts with '/'" in error.message and error.allowed == URI_ALLOWED
    assert isinstance(error.value, str) and len(error.value) <= 80 and error.value.startswith("s3://darkroom//q")


_SEGMENT = st.text(alphabet=string.ascii_letters + string.digits + "._-/\n\x00 ", min_size=0, max_size=30)


@given(_SEGMENT)
def test_a_parsed_key_is_already_normal(key: str) -> None:
    """Whatever the parser accepts, a folding store (SeaweedFS) and a literal one (AWS) read the same key."""
    try:
        uri = S3Uri.parse(f"s3://darkroom/{key}")
    except InvalidUri:
        return
    assert "/".join(uri.segments) == uri.key


@given(st.lists(st.sampled_from(["", ".", "..", "quarantine", "q", "x"]), min_size=1, max_size=6))
def test_is_under_compares_normalised_keys(parts: list[str]) -> None:
    """A key built by hand (a listing, a stored record) is judged as a folding store would read it."""
    uri = S3Uri("darkroom", "/".join(parts))
    quarantine = S3Uri("darkroom", "quarantine")
    assert uri.is_under(quarantine) == (uri.segments[:1] == ("quarantine",))


def test_is_under_does_not_take_a_neighbour_for_the_prefix() -> None:
    quarantine = S3Uri("darkroom", "quarantine")
    assert S3Uri("darkroom", "quarantine//victim/0.png").is_under(quarantine)
    assert S3Uri("darkroom", "a/../quarantine/0.png").is_under(quarantine)
    assert not S3Uri("darkroom", "quarantine-reports/0.png").is_under(quarantine)
    assert not S3Uri("elsewhere", "quarantine/0.png").is_under(quarantine)


# -- ids -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("field", "value"), [("job_id", "x\n"), ("model", "tiny\n"), ("producer", "p\n"),
                                               ("job_id", "x\ny"), ("model", "tiny\x00")])
def test_ids_with_a_trailing_newline_are_refused(field: str, value: str) -> None:
    with pytest.raises(InvalidJobError) as refused:
        validate_job({**JOB, field: value})
    assert refused.value.errors[0].field == field


def test_adapter_ids_and_tokens_are_full_matched() -> None:
    for fields in ({"adapters": [{"uri": "style\n"}]}, {"textual_inversions": [{"uri": EMB, "token": "<t>\n"}]}):
        with pytest.raises(InvalidJobError):
            validate_job({**JOB, **fields})
    assert validate_job({**JOB, "adapters": [{"uri": "style-1.v2"}]}).adapters[0].uri == "style-1.v2"


_ID_CHARS = string.ascii_letters + string.digits + "_.-"


@given(st.text(min_size=1, max_size=140))
def test_an_id_is_accepted_exactly_when_it_full_matches(value: str) -> None:
    expected = (len(value) <= 128 and value[0] in string.ascii_letters + string.digits
                and all(c in _ID_CHARS for c in value))
    try:
        validate_job({**JOB, "job_id": value, "model": value})
        accepted = True
    except InvalidJobError:
        accepted = False
    assert accepted == expected, repr(value)


# -- the policy ----------------------------------------------------------------------------
def test_job_references_lists_every_field_that_names_an_object() -> None:
    fields = {r.field for field in REFERENCES for r in job_references(validate_job(job_with(field, EMB)))}
    assert fields == set(REFERENCES)


def test_a_registry_adapter_id_is_the_operators_and_not_a_reference() -> None:
    refs = job_references(job(adapters=[{"uri": "style"}]))
    assert [r.field for r in refs] == ["image", "output_prefix"]


@pytest.mark.parametrize("field", list(REFERENCES))
def test_the_worker_refuses_every_reference_under_the_quarantine(field: str) -> None:
    screening = Screening(NoChecker(), quarantine_prefix=QUARANTINE)
    with pytest.raises(JobError) as refused:
        screening.rules(validate_job(job_with(field, f"{QUARANTINE}/victim/000.safetensors")))
    assert refused.value.code is ErrorCode.INVALID_JOB
    assert f"quarantine prefix {QUARANTINE}" in refused.value.message and field in refused.value.message


@pytest.mark.parametrize("field", list(REFERENCES))
def test_the_worker_refuses_every_reference_outside_the_allowed_buckets(field: str) -> None:
    screening = Screening(NoChecker(), allowed_buckets=["darkroom"])
    with pytest.raises(JobError) as refused:
        screening.rules(validate_job(job_with(field, "s3://elsewhere/x/e.safetensors")))
    assert refused.value.code is ErrorCode.BUCKET_NOT_ALLOWED and "'elsewhere'" in refused.value.message


def test_an_output_folder_named_like_the_quarantine_is_refused() -> None:
    """output_prefix s3://darkroom with job id "quarantine" would write s3://darkroom/quarantine/000.png."""
    with pytest.raises(JobError, match="quarantine prefix"):
        Screening(NoChecker()).rules(job(output_prefix="s3://darkroom", job_id="quarantine"))
    Screening(NoChecker()).rules(job(output_prefix="s3://darkroom", job_id="quarantined"))


def test_the_sdk_refuses_at_submit_listing_every_refused_reference() -> None:
    settings = Settings(allowed_buckets=["darkroom"])
    fields = {**JOB, "ip_adapter_image": f"{QUARANTINE}/v/0.png", "prompt": None, "prompt_embeds": "s3://other/e.safetensors",
              "adapters": [{"uri": "s3://other/l.safetensors"}]}
    with pytest.raises(InvalidJobError) as refused:
        prepare({k: v for k, v in fields.items() if v is not None}, settings, [])
    by_field = {e.field: e for e in refused.value.errors}
    assert set(by_field) == {"ip_adapter_image", "prompt_embeds", "adapters.0.uri"}
    assert "quarantine" in by_field["ip_adapter_image"].message
    assert by_field["prompt_embeds"].allowed == "buckets darkroom"


def test_the_dashboard_proxies_an_input_only_through_the_policy() -> None:
    policy = ReferencePolicy(frozenset({"darkroom"}), S3Uri.parse(QUARANTINE))
    now = datetime.now(UTC)

    def record(image: str) -> JobRecord:
        return JobRecord(job_id="job-1", status=JobStatus.SUCCEEDED, job=job(image=image), created_at=now,
                         updated_at=now)

    assert input_object(record("s3://darkroom/in/a.png"), Role.VIEWER, policy) == "s3://darkroom/in/a.png"
    for image in (f"{QUARANTINE}/victim/000.png", "s3://elsewhere/in/a.png"):
        for role in Role:
            assert input_object(record(image), role, policy) is None, (image, role)
    assert not policy.readable("image", "s3://darkroom//quarantine/victim/000.png")  # a record stored before


# -- the operator's registry goes through the same checks --------------------------------------
@pytest.mark.parametrize(("model_id", "source", "says"), [
    ("tiny\n", "s3://models/tiny", "is not an id"),
    ("-tiny", "s3://models/tiny", "is not an id"),
    ("tiny", "s3://models//tiny", "starts with '/'"),
    ("tiny", "s3://models/a/../tiny", "'..' segment"),
])
def test_the_registry_refuses_ids_and_sources_a_job_could_not_name(model_id: str, source: str, says: str) -> None:
    from darkroom.common.errors import ConfigurationError
    from darkroom.worker.registry import ModelRegistry

    with pytest.raises(ConfigurationError, match=re.escape(says)):
        ModelRegistry.build(extra={model_id: source})
    assert ModelRegistry.build(extra={"tiny": "s3://models/tiny/"}).ids == ["tiny"]


def test_registry_adapter_ids_are_full_matched(tmp_path: Any) -> None:
    from darkroom.common.errors import ConfigurationError
    from darkroom.worker.registry import AdapterSpec, ModelRegistry

    with pytest.raises(ConfigurationError, match="is not an id"):
        ModelRegistry().add_adapter(AdapterSpec("style\n", "s3://loras/style.safetensors"))


def test_a_record_stored_before_the_strict_rules_stays_readable_but_is_never_run_or_proxied() -> None:
    """Strict with what a producer submits, tolerant with what another process stored: a pre-upgrade record
    naming s3://darkroom//quarantine/... still loads (pages, the worker's failure path), and nothing reads it."""
    now = datetime.now(UTC)
    fields = {**JOB, "image": "s3://darkroom//quarantine/victim/000.png"}
    stored = json.dumps({"job_id": "job-1", "status": "queued", "job": fields, "created_at": now.isoformat(),
                         "updated_at": now.isoformat()})
    record = JobRecord.model_validate_json(stored)
    assert record.job.image == fields["image"]
    with pytest.raises(InvalidJobError, match="starts with '/'"):
        validate_job(fields)  # what the worker does with the message
    policy = ReferencePolicy(frozenset(), S3Uri.parse(QUARANTINE))
    assert input_object(record, Role.ADMIN, policy) is None
