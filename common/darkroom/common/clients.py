"""Clients built from :class:`Settings`. Called by entrypoints, never at import."""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio

from .settings import Settings

__all__ = ["make_redis", "make_async_redis", "make_s3_client"]


def make_redis(settings: Settings) -> redis.Redis:
    """A Redis client for status and events (bytes in, bytes out)."""
    return redis.Redis.from_url(
        settings.redis_url.get_secret_value(), socket_connect_timeout=5, health_check_interval=30,
        socket_timeout=settings.redis_socket_timeout_seconds
    )


def make_async_redis(settings: Settings) -> redis.asyncio.Redis:
    """The same as :func:`make_redis` for asyncio code."""
    return redis.asyncio.Redis.from_url(
        settings.redis_url.get_secret_value(), socket_connect_timeout=5, health_check_interval=30,
        socket_timeout=settings.redis_socket_timeout_seconds
    )


def make_s3_client(settings: Settings) -> Any:
    """A boto3 S3 client for the configured endpoint, with path-style addressing and bounded retries."""
    import boto3
    from botocore.config import Config

    secret = settings.s3_secret_access_key
    key = settings.s3_access_key_id
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        aws_access_key_id=key.get_secret_value() if key else None,
        aws_secret_access_key=secret.get_secret_value() if secret else None,
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
            signature_version="s3v4",
        ),
    )
