"""Settings shared by producers and workers (environment variables ``DARKROOM_*``).

Built once in an entrypoint with :meth:`Settings.load` and passed down; nothing
reads the environment at import time. When no Redis/S3 is configured, the
embedded services' env file (``<state_dir>/services.env``, written by
``darkroom services up``) supplies them; real environment variables win.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "DEFAULT_STATE_DIR"]

DEFAULT_STATE_DIR = Path(".darkroom")


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

    @classmethod
    def load(cls, **overrides: Any) -> Self:
        """Build settings from the environment, the embedded services' env file, then ``overrides``."""
        state_dir = Path(overrides.get("state_dir") or os.environ.get("DARKROOM_STATE_DIR") or DEFAULT_STATE_DIR)
        env_file = state_dir / "services.env"
        return cls(_env_file=env_file if env_file.is_file() else None, **overrides)

    def bucket_allowed(self, bucket: str) -> bool:
        return not self.allowed_buckets or bucket in self.allowed_buckets
