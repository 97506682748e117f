"""Signed submissions: the envelope, what breaks it, and what a stored record keeps of it."""

from __future__ import annotations

import base64
import json
import time

import pytest

from darkroom.common.identity import AUTH_FIELD, Signer, Unauthenticated, canonical_job, sign_job, verify_job
from darkroom.common.jobs import validate_job
from darkroom.common.jobstore import JobRecord, stage_create
from darkroom.common.lifecycle import message_job
from darkroom.common.producers import Producer, ProducerKey, acl_lines, new_key
from darkroom.common.settings import Settings
from darkroom.producer import _submission as submission

NOW = 1_765_000_000.0
KEY_ID, SECRET = new_key()
TEAM_A = Producer(id="team-a", keys=[ProducerKey(key_id=KEY_ID, secret=SECRET, created_at=NOW - 10)])
JOB = {"job_id": "team-a.j1", "model": "tiny", "image": "s3://darkroom/in/a.png", "prompt": "a cat", "producer": "team-a",
       "seed": 1, "output_prefix": "s3://darkroom/outputs"}


def lookup(producer_id: str) -> Producer | None:
    return TEAM_A if producer_id == "team-a" else None


def signed(job: dict[str, object] = JOB, **changes: object) -> tuple[dict[str, object], dict[str, object]]:
    data = validate_job(dict(job)).model_dump(mode="json")
    return data, {**sign_job(data, "team-a", KEY_ID, SECRET, int(NOW)).model_dump(), **changes}


def test_a_signed_job_verifies_as_its_producer() -> None:
    data, auth = signed()
    assert verify_job(data, auth, lookup, now=NOW, max_age=60).id == "team-a"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"prompt": "a dog"}, "signature does not match"),
        ({"output_prefix": "s3://darkroom/other"}, "signature does not match"),
        ({"callback_url": "https://evil.example.com/"}, "signature does not match"),
    ],
)
def test_any_changed_field_breaks_the_signature(change: dict[str, object], message: str) -> None:
    data, auth = signed()
    with pytest.raises(Unauthenticated, match=message):
        verify_job({**data, **change}, auth, lookup, now=NOW, max_age=60)


def test_unsigned_unknown_wrong_key_stale_and_future_are_refused_with_reasons() -> None:
    data, auth = signed()
    cases = [
        (None, NOW, "not signed"),
        ({**auth, "producer": "team-b"}, NOW, "'team-b' is not registered"),
        ({**auth, "key_id": "nope"}, NOW, "unknown or expired"),
        ({**auth, "signature": "v1,AAAA"}, NOW, "does not match"),
        ({"producer": "team-a"}, NOW, "malformed"),
        (auth, NOW + 120, "old; messages older than 60 s"),
        (auth, NOW - 3600, "in the future"),
    ]
    for envelope, now, reason in cases:
        with pytest.raises(Unauthenticated, match=reason):
            verify_job(data, envelope, lookup, now=now, max_age=60)
    # a stored record is checked without the age limit
    assert verify_job(data, auth, lookup, now=NOW + 10**6, max_age=None).id == "team-a"


def test_a_job_claiming_another_producer_is_refused_even_when_signed() -> None:
    data, auth = signed({**JOB, "producer": "team-b"})
    with pytest.raises(Unauthenticated, match="names producer 'team-b' but was signed by 'team-a'"):
        verify_job(data, auth, lookup, now=NOW, max_age=60)


def test_an_expired_key_no_longer_verifies() -> None:
    old = Producer(id="team-a", keys=[ProducerKey(key_id=KEY_ID, secret=SECRET, created_at=NOW - 100,
                                                  expires_at=NOW - 1)])
    data, auth = signed()
    with pytest.raises(Unauthenticated, match="unknown or expired"):
        verify_job(data, auth, lambda _: old, now=NOW, max_age=60)


def test_the_record_and_the_message_carry_the_same_signed_job() -> None:
    # Given a job the SDK prepared and signed
    settings = Settings(producer_id="team-a", producer_key_id=KEY_ID, producer_key=SECRET)  # type: ignore[arg-type]
    job = submission.prepare(dict(JOB), settings, [])

    class Pipe:
        def __init__(self) -> None:
            self.calls: list[tuple[object, ...]] = []

        def eval(self, *args: object) -> None:
            self.calls.append(args)

    pipe = Pipe()
    submission.Stager(3600, "test", submission.signer(settings)).stage(pipe, job, "q")
    (call,) = pipe.calls
    record_json = call[2 + 5]  # script, key count, 5 keys, then the record
    record = json.loads(record_json)  # type: ignore[arg-type]
    envelope = json.loads(call[-1])  # type: ignore[arg-type]  # the LPUSH of the broker message
    args = json.loads(base64.b64decode(envelope["body"]))[0][0]
    # Then both verify (the record as stored, the message as sent) and the message's job validates without it
    now = time.time()
    assert verify_job(record["job"], record[AUTH_FIELD], lookup, now=now, max_age=60).id == "team-a"
    assert verify_job(args, args[AUTH_FIELD], lookup, now=now, max_age=60).id == "team-a"
    assert canonical_job(record["job"]) == canonical_job(args)
    job_id, parsed, invalid, _ = message_job(args)
    assert job_id == "team-a.j1" and invalid is None and parsed == job
    assert JobRecord.read(record_json).auth == record[AUTH_FIELD]  # type: ignore[arg-type]
    assert stage_create  # the staging function the Stager calls


def test_a_signing_client_submits_only_as_itself() -> None:
    settings = Settings(producer_id="team-a", producer_key_id=KEY_ID, producer_key=SECRET)  # type: ignore[arg-type]
    from darkroom.common.errors import InvalidJobError

    with pytest.raises(InvalidJobError, match="signs as producer 'team-a'"):
        submission.prepare({**JOB, "producer": "team-b"}, settings, [])
    assert submission.prepare({k: v for k, v in JOB.items() if k != "producer"}, settings, []).producer == "team-a"


def test_signer_envelope_round_trips() -> None:
    data, _ = signed()
    envelope = Signer("team-a", KEY_ID, SECRET).envelope(data)
    assert verify_job(data, envelope, lookup, now=envelope["timestamp"], max_age=60).id == "team-a"


def test_acl_lines_never_grant_the_registry() -> None:
    (line,) = acl_lines("team-a", "pw")
    assert line.startswith("ACL SETUSER darkroom-producer-team-a reset on >pw ")
    assert [w for w in line.split() if "darkroom:producers" in w] == ["%R~darkroom:producers:policy:team-a"]
    assert "~*" not in line.split() and "+@all" not in line and "+keys" not in line


def test_producer_ids_have_no_dot_so_no_namespace_holds_another() -> None:
    from pydantic import ValidationError

    assert Producer(id="team").namespace == "team." and not "team-a.x".startswith(Producer(id="team").namespace)
    with pytest.raises(ValidationError, match="no '.'"):
        Producer(id="team.a")
