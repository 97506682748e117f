"""Who is asking: credentials from the ``Authorization`` header, roles, and the CSRF check of actions.

Two roles. An **admin** sees flagged outputs and quarantined originals and may act (cancel a job,
replay a webhook); a **viewer** only looks, and flagged images are hidden from it. A viewer may be
bound to one producer (``DARKROOM_DASHBOARD_PRODUCER_TOKENS``): it then sees only that producer's jobs
(see :func:`sees`). Credentials:

* ``Authorization: Bearer <token>``: the admin or the viewer token (scripts, API clients);
* HTTP basic auth: the admin user and password, or any user name with a token as the password
  (what a browser's login prompt sends).

With no credentials configured the dashboard is open to whoever reaches it, which it only allows
on a loopback address (see :meth:`DashboardSettings.check_binding`); every visitor is then an admin,
and requests must name a loopback ``Host`` (a page elsewhere cannot rebind a DNS name to us).

Actions are ``POST`` only and, unless the request carries a Bearer token (which a browser never
adds by itself), need the ``X-Darkroom-CSRF`` header with the token the page was rendered with:
browsers resend basic-auth credentials on their own, but a page of another origin can neither read
that token nor set the header.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit

from darkroom.common.producers import job_namespace

from .settings import DashboardSettings, is_loopback

__all__ = ["Authenticator", "Principal", "Role", "CSRF_HEADER", "sees"]

CSRF_HEADER = "x-darkroom-csrf"


class Role(StrEnum):
    VIEWER = "viewer"
    ADMIN = "admin"


@dataclass(frozen=True)
class Principal:
    """An authenticated visitor: its role and how it proved it (``bearer``, ``basic`` or ``open``)."""

    role: Role
    via: str
    producer: str | None = None  # a viewer bound to one producer: only its jobs are shown

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


class Authenticator:
    """Checks credentials against the settings; compares secrets in constant time."""

    def __init__(self, settings: DashboardSettings, *, key: bytes | None = None) -> None:
        self._tokens: list[tuple[bytes, Role, str | None]] = []
        if settings.dashboard_token is not None:
            self._tokens.append((settings.dashboard_token.get_secret_value().encode(), Role.ADMIN, None))
        if settings.dashboard_viewer_token is not None:
            self._tokens.append((settings.dashboard_viewer_token.get_secret_value().encode(), Role.VIEWER, None))
        for producer, token in sorted(settings.dashboard_producer_tokens.items()):
            self._tokens.append((token.get_secret_value().encode(), Role.VIEWER, producer))
        self._user = settings.dashboard_user.encode() if settings.dashboard_user is not None else None
        password = settings.dashboard_password
        self._password = password.get_secret_value().encode() if password is not None else None
        self.open = not settings.has_credentials
        self._key = key or secrets.token_bytes(32)  # per process: CSRF tokens die with it

    def authenticate(self, authorization: str | None, host: str | None = None) -> Principal | None:
        """The visitor behind an ``Authorization`` header (and ``Host``), or None when refused."""
        if self.open:
            return Principal(Role.ADMIN, "open") if _loopback_host(host) else None
        scheme, _, value = (authorization or "").strip().partition(" ")
        if scheme.lower() == "bearer":
            return self._token_principal(value.strip().encode(), "bearer")
        if scheme.lower() == "basic":
            user, password = _basic(value.strip())
            if password is None:
                return None
            if self._user is not None and self._password is not None and hmac.compare_digest(user, self._user) \
                    and hmac.compare_digest(password, self._password):
                return Principal(Role.ADMIN, "basic")
            return self._token_principal(password, "basic")
        return None

    def csrf_token(self, principal: Principal) -> str:
        """The token a page embeds for its actions (the same for every page this process renders)."""
        return hmac.new(self._key, f"{principal.role}:{principal.via}:{principal.producer or ''}".encode(),
                        hashlib.sha256).hexdigest()

    def may_act(self, principal: Principal, csrf: str | None, origin: str | None, host: str | None) -> bool:
        """Whether an action request may go ahead: an admin, from this origin, with the page's CSRF token."""
        if not principal.is_admin:
            return False
        if origin and origin != "null" and urlsplit(origin).netloc != (host or ""):
            return False
        if principal.via == "bearer":  # never sent by a browser on its own
            return True
        return csrf is not None and hmac.compare_digest(csrf.encode(), self.csrf_token(principal).encode())

    def _token_principal(self, presented: bytes, via: str) -> Principal | None:
        found = None
        for token, role, producer in self._tokens:  # compare with every token: the time does not tell which matched
            if hmac.compare_digest(presented, token):
                found = Principal(role, via, producer)
        return found


def sees(principal: Principal, job_id: str, owner: str | None) -> bool:
    """Whether ``principal`` may see a job: anyone but a producer-bound viewer; that one only its producer's jobs
    (the job's owner, and an id in the producer's namespace ``{producer}.``)."""
    if principal.producer is None:
        return True
    return owner == principal.producer and job_id.startswith(job_namespace(principal.producer))


def _basic(value: str) -> tuple[bytes, bytes | None]:
    try:
        decoded = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return b"", None
    user, sep, password = decoded.partition(b":")
    return (user, password) if sep else (b"", None)


def _loopback_host(host: str | None) -> bool:
    if not host:
        return False
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if host.startswith("["):
        name = host[: host.index("]") + 1]
    return is_loopback(name)
