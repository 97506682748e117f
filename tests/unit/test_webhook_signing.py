"""Standard Webhooks signing and verification, and the callback URL policy (no network: a fake resolver)."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from darkroom.common.errors import DarkroomError
from darkroom.common.webhooks import (
    WebhookVerificationError,
    check_callback_url,
    generate_secret,
    resolve_callback,
    sign,
    verify,
)

# The published Standard Webhooks test vector (the reference libraries' own tests use it).
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
MSG_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
TIMESTAMP = 1614265330
BODY = b'{"test": 2432232314}'
SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def headers(signature: str = SIGNATURE, timestamp: int = TIMESTAMP, msg_id: str = MSG_ID) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp), "webhook-signature": signature}


# -- signing ----------------------------------------------------------------
def test_sign_reproduces_the_published_vector() -> None:
    assert sign(SECRET, MSG_ID, TIMESTAMP, BODY) == SIGNATURE


def test_verify_accepts_the_published_vector_with_any_header_case() -> None:
    verify(SECRET, headers(), BODY, now=TIMESTAMP)
    verify(SECRET, {k.upper(): v for k, v in headers().items()}, BODY.decode(), now=TIMESTAMP + 299)


def test_round_trip_with_a_generated_secret() -> None:
    secret = generate_secret()
    assert secret.startswith("whsec_") and len(secret) > 40
    assert generate_secret() != secret
    signature = sign(secret, "msg_1", 1_700_000_000, b"{}")
    verify(secret, headers(signature, 1_700_000_000, "msg_1"), b"{}", now=1_700_000_000)


@pytest.mark.parametrize(
    ("secret", "hdrs", "body", "reason"),
    [
        (SECRET, headers(), b'{"test": 2432232315}', "altered body"),
        (generate_secret(), headers(), BODY, "wrong secret"),
        (SECRET, headers(msg_id="msg_other"), BODY, "another webhook-id"),
        (SECRET, headers(signature="v1,Zm9yZ2VkIHNpZ25hdHVyZQ=="), BODY, "forged signature"),
        (SECRET, headers(signature=SIGNATURE.replace("v1,", "v2,")), BODY, "unknown version"),
        (SECRET, headers(signature=SIGNATURE.replace("v1,", "v1a,")), BODY, "asymmetric scheme"),
    ],
)
def test_forged_or_altered_requests_fail(secret: str, hdrs: dict[str, str], body: bytes, reason: str) -> None:
    with pytest.raises(WebhookVerificationError, match="no v1 signature"):
        verify(secret, hdrs, body, now=TIMESTAMP)


def test_a_signature_for_another_timestamp_fails() -> None:
    # the timestamp is signed: moving it (to look fresh) breaks the signature
    with pytest.raises(WebhookVerificationError, match="no v1 signature"):
        verify(SECRET, headers(timestamp=TIMESTAMP + 100), BODY, now=TIMESTAMP + 100)


def test_stale_and_future_timestamps_fail_even_when_signed() -> None:
    with pytest.raises(WebhookVerificationError, match="301 s old"):
        verify(SECRET, headers(), BODY, now=TIMESTAMP + 301)
    with pytest.raises(WebhookVerificationError, match="in the future"):
        verify(SECRET, headers(), BODY, now=TIMESTAMP - 301)
    verify(SECRET, headers(), BODY, now=TIMESTAMP + 3000, tolerance_seconds=3600)


def test_verify_against_the_real_clock_refuses_an_old_request() -> None:
    with pytest.raises(WebhookVerificationError, match="old"):
        verify(SECRET, headers(), BODY)


def test_any_matching_signature_in_a_multi_signature_header_passes() -> None:
    # senders rotating secrets put several space-separated signatures in the header
    other = sign(generate_secret(), MSG_ID, TIMESTAMP, BODY)
    verify(SECRET, headers(f"{other} v1a,c29tZXRoaW5n {SIGNATURE}"), BODY, now=TIMESTAMP)
    verify(SECRET, headers(f"v1,bm9wZQ== {SIGNATURE}"), BODY, now=TIMESTAMP)
    with pytest.raises(WebhookVerificationError):
        verify(SECRET, headers(f"{other} v1,bm9wZQ=="), BODY, now=TIMESTAMP)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_headers_fail_with_their_name(missing: str) -> None:
    hdrs = {k: v for k, v in headers().items() if k != missing}
    with pytest.raises(WebhookVerificationError, match=f"missing {missing}"):
        verify(SECRET, hdrs, BODY, now=TIMESTAMP)


def test_non_numeric_timestamp_and_bad_secret_fail_clearly() -> None:
    with pytest.raises(WebhookVerificationError, match="not an integer"):
        verify(SECRET, headers(timestamp="soon"), BODY, now=TIMESTAMP)  # type: ignore[arg-type]
    with pytest.raises(WebhookVerificationError, match="whsec_"):
        verify("whsec_not base64!", headers(), BODY, now=TIMESTAMP)
    with pytest.raises(ValueError, match="darkroom webhooks secret"):
        sign("whsec_", MSG_ID, TIMESTAMP, BODY)


def test_the_verification_error_is_a_darkroom_error() -> None:
    assert issubclass(WebhookVerificationError, DarkroomError)


# -- callback URL policy --------------------------------------------------------
def resolver(*addresses: str) -> Any:
    """A getaddrinfo stand-in: every host resolves to ``addresses``."""

    def resolve(host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
        family = socket.AF_INET
        return [(family, socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses]

    return resolve


def no_dns(host: str, port: int, **_: Any) -> list[tuple[Any, ...]]:
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.7", "private"),
        ("172.16.5.4", "private"),
        ("169.254.10.10", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("100.64.0.1", "not globally routable"),
        ("224.0.0.1", "multicast"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fc00::5", "private"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("2002:7f00:1::1", "loopback"),  # 6to4 around 127.0.0.1
    ],
)
def test_hostnames_resolving_to_internal_addresses_are_refused(address: str, kind: str) -> None:
    with pytest.raises(ValueError, match=f"resolves to .*{kind}.*DARKROOM_ALLOW_PRIVATE_CALLBACKS"):
        check_callback_url("https://hooks.example.com/x", allow_private=False, resolve=resolver(address))
    # the same address is fine where private callbacks are allowed
    check_callback_url("https://hooks.example.com/x", allow_private=True, resolve=resolver(address))


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8080/hook", "http://10.0.0.8/hook", "http://[::1]/hook", "http://localhost/x"]
)
def test_literal_internal_addresses_and_localhost_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="refused"):
        check_callback_url(url, allow_private=False, resolve=resolver("127.0.0.1"))


@pytest.mark.parametrize(
    ("url", "addresses"),
    [
        ("http://hooks.example.com/x", ("169.254.169.254",)),
        ("http://169.254.169.254/latest/meta-data/", ()),
        ("http://[fd00:ec2::254]/latest", ()),
        ("http://metadata.google.internal/computeMetadata/v1/", ("8.8.8.8",)),
        ("http://METADATA.google.internal./x", ("8.8.8.8",)),
        ("http://hooks.example.com/x", ("::ffff:169.254.169.254",)),
    ],
)
def test_cloud_metadata_is_refused_even_when_private_callbacks_are_allowed(url: str, addresses: tuple[str, ...]) -> None:
    for allow_private in (False, True):
        with pytest.raises(ValueError, match="metadata"):
            check_callback_url(url, allow_private=allow_private, resolve=resolver(*addresses))


def test_one_internal_address_among_public_ones_is_enough_to_refuse() -> None:
    with pytest.raises(ValueError, match="10.0.0.1"):
        check_callback_url("https://hooks.example.com/", allow_private=False, resolve=resolver("93.184.216.34", "10.0.0.1"))


def test_public_addresses_pass_and_the_target_keeps_path_and_query() -> None:
    target = resolve_callback(
        "https://hooks.example.com:8443/darkroom/in?token=abc", allow_private=False,
        resolve=resolver("93.184.216.34", "93.184.216.34"),
    )
    assert (target.scheme, target.host, target.port) == ("https", "hooks.example.com", 8443)
    assert target.target == "/darkroom/in?token=abc"
    assert target.addresses == ("93.184.216.34",)
    assert resolve_callback("http://93.184.216.34", allow_private=False, resolve=no_dns).target == "/"
    assert resolve_callback("http://[2606:4700::1]/", allow_private=False, resolve=no_dns).port == 80


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://hooks.example.com/x", "scheme 'ftp'"),
        ("file:///etc/passwd", "scheme 'file'"),
        ("gopher://127.0.0.1:6379/_FLUSHALL", "scheme 'gopher'"),
        ("https://user:pw@hooks.example.com/", "credentials"),
        ("https:///path-only", "no host"),
        ("https://hooks.example.com:99999/", "port"),
    ],
)
def test_malformed_urls_are_refused_with_the_reason(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_callback_url(url, allow_private=True, resolve=resolver("93.184.216.34"))


def test_a_host_that_does_not_resolve_is_refused() -> None:
    with pytest.raises(ValueError, match="does not resolve"):
        check_callback_url("https://nowhere.invalid/", allow_private=False, resolve=no_dns)
