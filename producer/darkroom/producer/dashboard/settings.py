"""``DARKROOM_DASHBOARD_*`` settings of ``darkroom dashboard`` (on top of the shared ones)."""

from __future__ import annotations

import ipaddress
from typing import Self

from pydantic import Field, SecretStr, model_validator

from darkroom.common.errors import ConfigurationError
from darkroom.common.settings import Settings

__all__ = ["DashboardSettings", "is_loopback", "MIN_SECRET_LENGTH"]

MIN_SECRET_LENGTH = 12


class DashboardSettings(Settings):
    """Where the dashboard listens and who may use it. Secrets are ``SecretStr``: never printed or logged."""

    dashboard_host: str = Field(
        "127.0.0.1", description="Address the dashboard listens on; a non-loopback one needs credentials."
    )
    dashboard_port: int = Field(8090, ge=1, le=65535, description="Port the dashboard listens on.")
    dashboard_token: SecretStr | None = Field(
        None, description="Admin token (a Bearer token, or the password of basic auth with any user name): sees "
                          "flagged and quarantined images, may cancel jobs and replay webhooks (never logged).",
    )
    dashboard_viewer_token: SecretStr | None = Field(
        None, description="Viewer token, used the same way: read-only, flagged images hidden (never logged).",
    )
    dashboard_producer_tokens: dict[str, SecretStr] = Field(
        default_factory=dict,
        description='Viewer tokens bound to one producer each, JSON {"team-a": "<token>"}: such a viewer sees only '
                    "that producer's jobs, pictures and live job events (never logged).",
    )
    dashboard_user: str | None = Field(None, description="Basic-auth user name of an admin (with the password).")
    dashboard_password: SecretStr | None = Field(
        None, description="Basic-auth password of DARKROOM_DASHBOARD_USER (never logged)."
    )
    dashboard_poll_seconds: float = Field(
        1.0, gt=0, le=60, description="How often fleet, queue and augmentation views are re-read for live updates."
    )

    @model_validator(mode="after")
    def _credentials_complete(self) -> Self:
        if (self.dashboard_user is None) != (self.dashboard_password is None):
            raise ValueError("set DARKROOM_DASHBOARD_USER and DARKROOM_DASHBOARD_PASSWORD together, or neither")
        for name in ("dashboard_token", "dashboard_viewer_token", "dashboard_password"):
            secret = getattr(self, name)
            if secret is not None and len(secret.get_secret_value()) < MIN_SECRET_LENGTH:
                raise ValueError(f"DARKROOM_{name.upper()} must be at least {MIN_SECRET_LENGTH} characters long")
        for producer, secret in self.dashboard_producer_tokens.items():
            if len(secret.get_secret_value()) < MIN_SECRET_LENGTH:
                raise ValueError(f"DARKROOM_DASHBOARD_PRODUCER_TOKENS[{producer!r}] must be at least "
                                 f"{MIN_SECRET_LENGTH} characters long")
        tokens = [s.get_secret_value() for s in (self.dashboard_token, self.dashboard_viewer_token) if s is not None]
        tokens += [s.get_secret_value() for s in self.dashboard_producer_tokens.values()]
        if len(tokens) != len(set(tokens)):
            raise ValueError("the dashboard tokens (DARKROOM_DASHBOARD_TOKEN, _VIEWER_TOKEN, _PRODUCER_TOKENS) "
                             "must differ")
        return self

    @property
    def has_credentials(self) -> bool:
        return bool(self.dashboard_producer_tokens) or any(
            v is not None for v in (self.dashboard_token, self.dashboard_viewer_token, self.dashboard_user))

    def check_binding(self) -> None:
        """Refuse to listen beyond this machine without credentials (raises ConfigurationError)."""
        if not self.has_credentials and not is_loopback(self.dashboard_host):
            raise ConfigurationError(
                f"refusing to listen on {self.dashboard_host} without credentials: anyone who reaches it could "
                "cancel jobs. Set DARKROOM_DASHBOARD_TOKEN (and DARKROOM_DASHBOARD_VIEWER_TOKEN) or "
                "DARKROOM_DASHBOARD_USER/DARKROOM_DASHBOARD_PASSWORD, or listen on 127.0.0.1."
            )


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only reaches this machine."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another host name: it may resolve anywhere
