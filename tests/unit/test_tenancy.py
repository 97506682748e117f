"""A producer's policy on one job: each limit refuses with the field, the value and what is allowed."""

from __future__ import annotations

from darkroom.common.boundaries import ReferencePolicy, quarantine_prefix
from darkroom.common.errors import ErrorCode
from darkroom.common.jobs import validate_job
from darkroom.common.producers import Producer, ProducerPolicy
from darkroom.common.tenancy import PolicyCheck, job_cost, policy_errors

BASE = ReferencePolicy(frozenset(), quarantine_prefix("s3://darkroom/quarantine"))
POLICY = ProducerPolicy(read_prefixes=["s3://inputs/team"], write_prefixes=["s3://outputs/team/"], models=["tiny"],
                        adapters=["style"], max_priority="bulk", max_job_cost=64 * 64 * 10)  # type: ignore[arg-type]
OK = {"job_id": "j1", "model": "tiny", "image": "s3://inputs/team/a.png", "prompt": "p", "priority": "bulk",
      "resize_mode": "resize", "width": 64, "height": 64, "num_inference_steps": 10, "output_prefix": "s3://outputs/team"}


def errors(**changes: object) -> tuple[ErrorCode, list[str]]:
    code, found = policy_errors(validate_job({**OK, **changes}), POLICY, BASE)
    return code, [e.field for e in found]


def test_a_job_within_the_policy_passes() -> None:
    assert errors() == (ErrorCode.NOT_PERMITTED, [])
    assert job_cost(validate_job(OK)) == 64 * 64 * 10


def test_each_limit_names_its_field() -> None:
    assert errors(image="s3://inputs/team-2/a.png") == (ErrorCode.NOT_PERMITTED, ["image"])  # a sibling, not under
    assert errors(output_prefix="s3://outputs/elsewhere") == (ErrorCode.NOT_PERMITTED, ["output_prefix"])
    assert errors(model="big") == (ErrorCode.NOT_PERMITTED, ["model"])
    assert errors(adapters=[{"uri": "other"}]) == (ErrorCode.ADAPTER_NOT_ALLOWED, ["adapters.0.uri"])
    assert errors(adapters=[{"uri": "s3://elsewhere/l.safetensors"}])[1] == ["adapters.0.uri"]
    assert errors(priority="interactive") == (ErrorCode.NOT_PERMITTED, ["priority"])
    assert errors(num_inference_steps=11) == (ErrorCode.NOT_PERMITTED, ["num_inference_steps"])
    assert errors(image="s3://darkroom/quarantine/x.png") == (ErrorCode.INVALID_JOB, ["image"])  # quarantine first


def test_the_workers_check_reads_a_stored_job_and_says_whose_policy() -> None:
    check = PolicyCheck(BASE)
    producer = Producer(id="team", policy=POLICY)
    assert check(producer, validate_job(OK).model_dump(mode="json")) is None
    code, message = check(producer, {**validate_job(OK).model_dump(mode="json"), "model": "big"}) or (None, "")
    assert code is ErrorCode.NOT_PERMITTED and "producer 'team''s policy refuses the job" in message
    assert check(producer, {"not": "a job"}) is None  # validation refuses it next, with its fields
