"""Secrets in URLs, kept out of what is shown or stored for others to read.

A job's ``callback_url`` often carries a token (``https://hooks.example/cb?token=...`` or
``https://user:secret@hooks.example/``). The dispatcher needs it whole; ``result.json``, webhook
bodies and dashboard pages do not. :func:`redact_url` keeps scheme, host, port and path, and
replaces userinfo, query and fragment; :func:`redact_parameters` applies it to a job's fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = ["REDACTED", "URL_FIELDS", "redact_parameters", "redact_url"]

REDACTED = "redacted"
URL_FIELDS = frozenset({"callback_url"})
"""Job fields whose URLs may hold secrets."""


def redact_url(url: str) -> str:
    """``url`` with userinfo, query and fragment replaced by ``redacted``; an unparsable one entirely."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return REDACTED
    if not parts.scheme or not host:
        return REDACTED if any(c in url for c in "@?#") else url
    netloc = ("[" + host + "]" if ":" in host else host) + (f":{port}" if port is not None else "")
    if parts.username is not None or parts.password is not None:
        netloc = f"{REDACTED}@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, REDACTED if parts.query else "",
                       REDACTED if parts.fragment else ""))


def redact_parameters(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a job's fields (``model_dump``) with every URL that may hold a secret redacted."""
    return {key: redact_url(value) if key in URL_FIELDS and isinstance(value, str) else value
            for key, value in parameters.items()}
