"""Settings shared by producers and workers (environment variables ``DARKROOM_*``).

Built once in an entrypoint with :meth:`Settings.load` and passed down; nothing
reads the environment at import time. When no Redis/S3 is configured, the
embedded services' env file (``<state_dir>/services.env``, written by
``darkroom services up``) supplies them; real environment variables win.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["Settings", "DEFAULT_STATE_DIR", "comma_list"]

DEFAULT_STATE_DIR = Path(".darkroom")


def comma_list(value: Any) -> Any:
    """A list setting from its environment form: ``a, b`` (comma-separated) or a JSON list; lists pass."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        return json.loads(value)
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Connection and policy settings. Secrets are ``SecretStr`` so they never print."""

    model_config = SettingsConfigDict(env_prefix="DARKROOM_", extra="ignore", env_file_encoding="utf-8")

    state_dir: Path = Field(DEFAULT_STATE_DIR, description="Folder for embedded services, caches and demo output.")
    redis_url: SecretStr = Field(
        SecretStr("redis://127.0.0.1:6379/0"),
        description="Broker and status store, redis:// or rediss:// (TLS), password inside (never logged).",
    )
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint; None means AWS.")
    s3_access_key_id: SecretStr | None = Field(None, description="S3 access key; None uses boto3's usual chain.")
    s3_secret_access_key: SecretStr | None = Field(None, description="S3 secret key (never logged).")
    s3_region: str = Field("us-east-1", description="S3 region name.")
    allowed_buckets: list[str] = Field(
        default_factory=list, description="Buckets jobs may read and write; empty allows any."
    )
    quarantine_prefix: str = Field(
        "s3://darkroom/quarantine",
        description="s3:// prefix for the originals of blurred and blocked images; keep it private. No job reads "
                    "or writes under it (checked at submit, by workers and by the dashboard).",
    )
    default_output_prefix: str = Field("s3://darkroom/outputs", description="Where outputs go when a job names no prefix.")
    status_ttl_seconds: int = Field(7 * 24 * 3600, ge=60, description="How long job status stays in Redis.")
    producer_id: str = Field("default", description="This producer's id; receivers verify webhooks with its secret.")
    allow_private_callbacks: bool = Field(
        False, description="Allow callback URLs on loopback/private/link-local addresses (tests, trusted networks)."
    )
    producer_key_id: str | None = Field(
        None, description="Id of this producer's signing key (darkroom producers add prints it); with "
                          "DARKROOM_PRODUCER_KEY, every submission is signed.",
    )
    producer_key: SecretStr | None = Field(None, description="This producer's signing key (never logged).")
    require_signed_jobs: bool = Field(
        False, description="Workers refuse unsigned jobs even with no producer registered (they always do once "
                           "one is).",
    )
    signature_max_age_seconds: int = Field(
        86_400, ge=60, description="Workers refuse a signed message older than this when no record of its job "
                                   "exists (replays); a job whose record exists runs from the record.",
    )
    fair_share: bool = Field(
        False, description="Submit bulk jobs to this producer's own queue per model; workers release them by "
                           "producer weight (fair share), interactive jobs still first.",
    )
    log_format: Literal["text", "json"] = Field("text", description="text for people, json (one object a line) for fleets.")
    redis_socket_timeout_seconds: float = Field(
        15.0, gt=0, description="Longest any Redis call may wait for an answer (connect and read); a stalled Redis "
                                "then raises instead of hanging a lease keeper or a submission.",
    )
    dead_letter_retention_seconds: int = Field(
        30 * 24 * 3600, ge=60, description="How long dead letters (jobs and unreadable messages) are kept.",
    )
    dead_letter_max: int = Field(10_000, ge=1, description="Most dead letters kept; the oldest go first.")
    outbox_progress_cap: int = Field(
        10_000, ge=0, description="Progress webhooks are queued only while the webhook outbox is shorter than this "
                                  "(status changes always are).",
    )
    visibility_timeout_seconds: int = Field(
        3600, ge=10, description="Broker redelivers an unacknowledged job after this long; keep above the longest job."
    )
    # -- Redis high availability (Sentinel); see docs/concepts/high-availability.md ----------------------------
    redis_sentinels: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Redis Sentinels as host:port, comma-separated in the environment; set, every client (broker, "
                    "job store, SDK) asks them for the current primary and follows failovers. DARKROOM_REDIS_URL "
                    "then gives only the password, database and scheme (rediss:// for TLS to Redis).",
    )
    redis_master_name: str = Field(
        "darkroom", min_length=1, description="The name the Sentinels monitor the primary under (sentinel monitor NAME).",
    )
    redis_sentinel_password: SecretStr | None = Field(
        None, description="Password of the Sentinels themselves (their requirepass; never logged); None: no AUTH.",
    )
    redis_sentinel_tls: bool = Field(False, description="Talk TLS to the Sentinels (TLS to Redis: a rediss:// URL).")
    redis_wait_replicas: int | None = Field(
        None, ge=0, le=16,
        description="Replicas that must confirm a submission (Redis WAIT) before the SDK acknowledges it; fewer "
                    "raise the retryable NotReplicated. None: 1 with Sentinels, 0 (no WAIT) without.",
    )
    redis_wait_timeout_ms: int = Field(
        1000, ge=1, le=60_000,
        description="How long a submission waits for its replicas (WAIT's timeout); keep below "
                    "redis_socket_timeout_seconds.",
    )

    @field_validator("redis_sentinels", mode="before")
    @classmethod
    def _split_sentinels(cls, value: Any) -> Any:
        return comma_list(value)

    @field_validator("redis_sentinels")
    @classmethod
    def _check_sentinels(cls, value: list[str]) -> list[str]:
        for entry in value:
            host, _, port = entry.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"redis_sentinels entry {entry!r} is not host:port (port 1..65535)")
        return value

    @model_validator(mode="after")
    def _wait_fits_socket_timeout(self) -> Self:
        if self.wait_replicas and self.redis_wait_timeout_ms >= self.redis_socket_timeout_seconds * 1000:
            raise ValueError(
                f"redis_wait_timeout_ms={self.redis_wait_timeout_ms} must be below redis_socket_timeout_seconds "
                f"({self.redis_socket_timeout_seconds} s = {self.redis_socket_timeout_seconds * 1000:.0f} ms), or "
                "a submission's WAIT would time out as a dead connection"
            )
        return self

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """``redis_sentinels`` as (host, port) pairs."""
        return [(host.strip("[]"), int(port)) for host, _, port in (e.rpartition(":") for e in self.redis_sentinels)]

    @property
    def wait_replicas(self) -> int:
        """Replicas a submission waits for: ``redis_wait_replicas``, else 1 under Sentinel and 0 without."""
        if self.redis_wait_replicas is not None:
            return self.redis_wait_replicas
        return 1 if self.redis_sentinels else 0

    @classmethod
    def load(cls, **overrides: Any) -> Self:
        """Build settings from the environment, the embedded services' env file, then ``overrides``."""
        state_dir = Path(overrides.get("state_dir") or os.environ.get("DARKROOM_STATE_DIR") or DEFAULT_STATE_DIR)
        env_file = state_dir / "services.env"
        return cls(_env_file=env_file if env_file.is_file() else None, **overrides)

    def bucket_allowed(self, bucket: str) -> bool:
        return not self.allowed_buckets or bucket in self.allowed_buckets
