"""The job contract refuses bad input at submit time, naming field, value and allowed range."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from darkroom.common.errors import InvalidJobError
from darkroom.common.jobs import MAX_SEED, Img2ImgJob, validate_job

BASE = {"model": "tiny", "image": "s3://darkroom/inputs/a.png", "prompt": "a cat"}


def refused(**fields: object) -> InvalidJobError:
    with pytest.raises(InvalidJobError) as info:
        validate_job({**BASE, **fields})
    return info.value


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("strength", 1.5, "0.0 <= strength <= 1.0"),
        ("strength", -0.1, "0.0 <= strength <= 1.0"),
        ("num_inference_steps", 0, "1 <= num_inference_steps <= 1000"),
        ("guidance_scale", 101.0, "0.0 <= guidance_scale <= 100.0"),
        ("num_images_per_prompt", 17, "1 <= num_images_per_prompt <= 16"),
        ("seed", -1, f"0 <= seed <= {MAX_SEED}"),
        ("output_quality", 0, "1 <= output_quality <= 100"),
        ("output_format", "gif", "one of png, jpeg, webp"),
    ],
)
def test_out_of_range_values_name_field_value_and_range(field: str, value: object, allowed: str) -> None:
    error = refused(**{field: value})
    assert [e.field for e in error.errors] == [field]
    assert error.errors[0].value == value
    assert error.errors[0].allowed == allowed
    assert field in str(error) and repr(value) in str(error) and allowed in str(error)


def test_every_bad_field_is_reported_at_once() -> None:
    error = refused(strength=2.0, num_inference_steps=0, seed=-5)
    assert {e.field for e in error.errors} == {"strength", "num_inference_steps", "seed"}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused(value: float) -> None:
    assert refused(guidance_scale=value).errors[0].field == "guidance_scale"


def test_unknown_fields_are_refused_with_the_known_ones_listed() -> None:
    error = refused(strenght=0.5)
    assert error.errors[0].field == "strenght"
    assert "strength" in error.errors[0].message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("image", "http://example.com/a.png"),
        ("image", "s3://Bad_Bucket/a.png"),
        ("image", "s3://darkroom"),
        ("output_prefix", "/tmp/out"),
        ("model", "../etc"),
        ("job_id", "has space"),
        ("callback_url", "ftp://x"),
        ("prompt", "x" * 4001),
    ],
)
def test_malformed_strings_are_refused(field: str, value: str) -> None:
    assert refused(**{field: value}).errors[0].field == field


def test_a_job_must_run_at_least_one_denoising_step() -> None:
    error = refused(strength=0.01, num_inference_steps=50)
    assert "int(num_inference_steps * strength) >= 1" in str(error)
    assert validate_job({**BASE, "strength": 0.02, "num_inference_steps": 50}).steps_to_run == 1


def test_defaults_follow_diffusers() -> None:
    job = validate_job(BASE)
    assert (job.strength, job.num_inference_steps, job.guidance_scale, job.num_images_per_prompt) == (0.8, 50, 7.5, 1)
    assert job.steps_to_run == 40


def test_seeds_are_consecutive_per_image() -> None:
    assert validate_job({**BASE, "seed": 7, "num_images_per_prompt": 3}).seeds() == [7, 8, 9]


def test_output_prefix_loses_its_trailing_slash() -> None:
    assert validate_job({**BASE, "output_prefix": "s3://darkroom/out/"}).output_prefix == "s3://darkroom/out"


jobs = st.fixed_dictionaries(
    {
        "model": st.from_regex(r"[a-z][a-z0-9_-]{0,20}", fullmatch=True),
        "image": st.from_regex(r"s3://[a-z0-9]{3,10}/([a-z0-9]{1,6}/){0,3}[a-z0-9]{1,8}\.png", fullmatch=True),
        "prompt": st.text(max_size=200),
        "strength": st.floats(0.05, 1.0),
        "num_inference_steps": st.integers(20, 1000),
        "guidance_scale": st.floats(0.0, 100.0),
        "seed": st.integers(0, MAX_SEED),
    }
)


@settings(max_examples=200, deadline=None)
@given(jobs)
def test_any_accepted_job_round_trips_through_json(data: dict[str, object]) -> None:
    job = validate_job(data)
    wire = json.dumps(job.model_dump(mode="json"))
    assert Img2ImgJob.model_validate(json.loads(wire)) == job


@settings(max_examples=200, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: not 0.0 <= x <= 1.0))
def test_any_out_of_range_strength_is_refused_with_a_field_message(value: float) -> None:
    error = refused(strength=value)
    assert error.errors[0].field == "strength"


scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True),
                    st.text(max_size=50), st.lists(st.integers(), max_size=3))
field_names = st.sampled_from([*Img2ImgJob.model_fields, "unknown_field", "strenght"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(field_names, scalars, max_size=8))
def test_any_json_is_either_accepted_and_round_trips_or_refused_field_by_field(extra: dict[str, object]) -> None:
    data = {**BASE, **extra}
    try:
        job = validate_job(data)
    except InvalidJobError as error:
        assert error.errors, "a refusal must name at least one field"
        for e in error.errors:
            top = e.field.split(".")[0]
            assert top in data or top == "(job)", e
            assert e.message
        return
    wire = json.loads(json.dumps(job.model_dump(mode="json")))
    assert validate_job(wire) == job  # the worker re-validates the same wire form
