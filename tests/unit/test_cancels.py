"""Signed cancel requests: what the signature covers and what verification refuses (no Redis needed)."""

from __future__ import annotations

import pytest

from darkroom.common.cancels import CancelAnswer, CancelRequest, sign_cancel, verify_cancel
from darkroom.common.errors import ErrorCode
from darkroom.common.identity import Signer, Unauthenticated
from darkroom.common.producers import Producer, ProducerKey

NOW = 1_765_000_000.0
TEAM_A = Producer(id="team-a", keys=[ProducerKey(key_id="k1", secret="dk_secret-a", created_at=0)])


def lookup(producer_id: str) -> Producer | None:
    return TEAM_A if producer_id == "team-a" else None


def signed(**changes: object) -> CancelRequest:
    request = sign_cancel(Signer("team-a", "k1", "dk_secret-a"), "team-a.1", "sub-1", request_id="r1",
                          timestamp=int(NOW))
    return request.model_copy(update=changes)


def test_a_signed_cancel_verifies_as_its_producer() -> None:
    assert verify_cancel(signed(), lookup, now=NOW, max_age=600).id == "team-a"


@pytest.mark.parametrize(("changes", "reason"), [
    ({"job_id": "team-a.2"}, "does not match"),
    ({"submission": "sub-2"}, "does not match"),        # a later resubmission of the same id
    ({"request_id": "r2"}, "does not match"),
    ({"auth": None}, "not signed"),
])
def test_any_change_after_signing_is_refused(changes: dict[str, object], reason: str) -> None:
    with pytest.raises(Unauthenticated, match=reason):
        verify_cancel(signed(**changes), lookup, now=NOW, max_age=600)


def test_an_old_or_unknown_signer_is_refused() -> None:
    with pytest.raises(Unauthenticated, match="more than 600 s from now"):
        verify_cancel(signed(), lookup, now=NOW + 601, max_age=600)
    other = sign_cancel(Signer("team-x", "k1", "dk_secret-a"), "team-a.1", "sub-1")
    with pytest.raises(Unauthenticated, match="'team-x' is not registered"):
        verify_cancel(other, lookup, now=NOW, max_age=600)


def test_answers_round_trip() -> None:
    for answer in (CancelAnswer("cancelled"), CancelAnswer(None), CancelAnswer(None, ErrorCode.NOT_PERMITTED, "no")):
        assert CancelAnswer.loads(answer.dumps()) == answer
