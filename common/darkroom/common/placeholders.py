"""Refuse placeholder secrets at start-up: a service left with ``change-me`` would run open to anyone.

``infra/env.example`` ships values such as ``change-me-redis`` so that ``docker compose`` can be read
before it is configured; the worker, the webhook dispatcher and the dashboard refuse to start while any
secret they are given still is such a value (or an explicitly empty password), with one line naming the
setting and what to do. A password that is simply absent (``redis://host:6379/0``: the embedded services,
a Redis on a private network) is not a placeholder.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from pydantic import SecretStr

from .errors import ConfigurationError
from .settings import Settings

__all__ = ["PLACEHOLDER_WORDS", "check_secrets", "is_placeholder"]

PLACEHOLDER_WORDS = ("change-me", "change_me", "changeme", "replace-me", "replaceme", "your-password", "<")
"""A secret containing any of these (case-insensitive) is a placeholder."""
_EXACT = frozenset({"", "password", "secret", "example", "placeholder", "xxx", "todo", "minioadmin", "admin",
                    "redis", "whsec_"})
"""...and so is a secret equal to one of these (after trimming, case-insensitive)."""


def is_placeholder(value: str) -> bool:
    text = value.strip().lower()
    return text in _EXACT or any(word in text for word in PLACEHOLDER_WORDS)


def _fix(name: str) -> str:
    return f"{name} is a placeholder; set a real secret (e.g. `openssl rand -hex 24`) and start again"


def check_secrets(settings: Settings, extra: Iterable[tuple[str, SecretStr | None]] = (),
                  named: Mapping[str, SecretStr] | None = None, named_setting: str = "") -> None:
    """Raise ConfigurationError naming the first placeholder among the service's secrets (never its value)."""
    password = urlsplit(settings.redis_url.get_secret_value()).password
    if password is not None and is_placeholder(password):
        raise ConfigurationError(_fix("the password in DARKROOM_REDIS_URL"))
    secrets = [("DARKROOM_S3_SECRET_ACCESS_KEY", settings.s3_secret_access_key), *extra]
    for name, secret in secrets:
        if secret is not None and is_placeholder(secret.get_secret_value()):
            raise ConfigurationError(_fix(name))
    for key, secret in (named or {}).items():
        if is_placeholder(secret.get_secret_value()):
            raise ConfigurationError(_fix(f"{named_setting}[{key!r}]"))
