"""submit_many's validation, without Redis: every bad job is named by its index before anything is sent."""

from __future__ import annotations

from typing import Any

import pytest

from darkroom.common.errors import InvalidJobError
from darkroom.common.jobs import Img2ImgJob
from darkroom.common.settings import Settings
from darkroom.producer import _submission as submission

GOOD: dict[str, Any] = {"model": "tiny", "image": "s3://darkroom/in/cat.png", "prompt": "a cat"}


def test_prepare_many_fills_ids_seeds_and_prefixes() -> None:
    jobs = submission.prepare_many([GOOD, Img2ImgJob(**GOOD, seed=5)], Settings(), [])
    assert len({j.job_id for j in jobs}) == 2
    assert jobs[1].seed == 5 and jobs[0].seed is not None
    assert all(j.output_prefix == "s3://darkroom/outputs" and j.producer == "default" for j in jobs)


def test_prepare_many_names_every_bad_job_by_index_and_field() -> None:
    jobs = [GOOD, {**GOOD, "strength": 1.5}, GOOD, {**GOOD, "prompt": 42, "steps": 3}]
    with pytest.raises(InvalidJobError) as refused:
        submission.prepare_many(jobs, Settings(), [])
    fields = sorted(e.field for e in refused.value.errors)
    assert fields == ["jobs[1].strength", "jobs[3].prompt", "jobs[3].steps"]
    assert "jobs[1].strength=1.5: Input should be less than or equal to 1; allowed: 0.0 <= strength <= 1.0" in str(
        refused.value)


def test_prepare_many_refuses_an_id_twice_in_one_batch() -> None:
    with pytest.raises(InvalidJobError, match=r"jobs\[2\].job_id='dup': repeats jobs\[0\].job_id"):
        submission.prepare_many([{**GOOD, "job_id": "dup"}, GOOD, {**GOOD, "job_id": "dup"}], Settings(), [])


def test_prepare_checks_buckets_and_the_fleets_models() -> None:
    settings = Settings(allowed_buckets=["darkroom"])
    with pytest.raises(InvalidJobError, match=r"jobs\[0\].image=.*bucket 'other' is not allowed"):
        submission.prepare_many([{**GOOD, "image": "s3://other/a.png"}], settings, [])
    with pytest.raises(InvalidJobError, match=r"jobs\[0\].model='tiny': no worker of this fleet serves"):
        submission.prepare_many([GOOD], settings, ["sd15"])


def test_chunks_cover_the_batch_in_order() -> None:
    jobs = submission.prepare_many([GOOD] * 5, Settings(), [])
    parts = list(submission.chunks(jobs, 2))
    assert [(first, len(part)) for first, part in parts] == [(0, 2), (2, 2), (4, 1)]
    with pytest.raises(ValueError, match="at least 1"):
        list(submission.chunks(jobs, 0))


def test_taken_ids_keep_their_batch_index() -> None:
    jobs = submission.prepare_many([GOOD] * 3, Settings(), [])
    assert submission.taken([1, 0, 1], jobs, 500) == [(501, jobs[1].job_id)]
    assert submission.taken([0], jobs[:1], None) == [(None, jobs[0].job_id)]
