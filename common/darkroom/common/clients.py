"""Clients built from :class:`Settings`. Called by entrypoints, never at import.

Every Redis client of Darkroom (job store, lifecycle, pub/sub, leases, dispatcher, dashboard, the SDKs) comes
from :func:`make_redis` or :func:`make_async_redis`. With ``redis_sentinels`` set they are Sentinel-managed:
each new connection asks the Sentinels for the current primary, and a connection to a primary that was
demoted (``READONLY``) or died is dropped and reopened on the new one, so the clients follow a failover.
``redis_url`` then supplies only the password, user, database and scheme (``rediss://``: TLS to Redis).
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel
from redis.connection import parse_url

from .settings import Settings

__all__ = ["make_redis", "make_async_redis", "make_s3_client", "make_sentinel", "redis_options", "sentinel_options"]

_CONNECT_TIMEOUT_S = 5.0


def redis_options(settings: Settings) -> dict[str, Any]:
    """Connection options every Redis client shares: timeouts (nothing waits forever) and health checks."""
    return {
        "socket_connect_timeout": _CONNECT_TIMEOUT_S,
        "socket_timeout": settings.redis_socket_timeout_seconds,
        "health_check_interval": 30,
    }


def sentinel_options(settings: Settings) -> dict[str, Any]:
    """Options of the connections to the Sentinels themselves: their password, TLS and the same timeouts."""
    options: dict[str, Any] = {
        "socket_connect_timeout": _CONNECT_TIMEOUT_S,
        "socket_timeout": settings.redis_socket_timeout_seconds,
    }
    if settings.redis_sentinel_password is not None:
        options["password"] = settings.redis_sentinel_password.get_secret_value()
    if settings.redis_sentinel_tls:
        options["ssl"] = True
    return options


def _primary_options(settings: Settings) -> dict[str, Any]:
    """What ``redis_url`` says about the primary apart from where it is: credentials, database, TLS."""
    parsed: dict[str, Any] = parse_url(settings.redis_url.get_secret_value())  # type: ignore[no-untyped-call]
    tls = parsed.pop("connection_class", None) is redis.SSLConnection
    for where in ("host", "port", "path"):
        parsed.pop(where, None)
    return {**parsed, **redis_options(settings), **({"ssl": True} if tls else {})}


def make_sentinel(settings: Settings) -> redis.sentinel.Sentinel:
    """A client of the configured Sentinels (``SENTINEL get-master-addr-by-name``, ``master_for``)."""
    if not settings.redis_sentinels:
        raise ValueError("no Sentinels configured (DARKROOM_REDIS_SENTINELS is empty)")
    return redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        settings.sentinel_addresses, sentinel_kwargs=sentinel_options(settings), **_primary_options(settings)
    )


def make_redis(settings: Settings) -> redis.Redis:
    """A Redis client for status and events (bytes in, bytes out); Sentinel-managed when Sentinels are set."""
    if settings.redis_sentinels:
        client: redis.Redis = make_sentinel(settings).master_for(  # type: ignore[no-untyped-call]
            settings.redis_master_name, redis_class=redis.Redis
        )
        return client
    return redis.Redis.from_url(settings.redis_url.get_secret_value(), **redis_options(settings))


def make_async_redis(settings: Settings) -> redis.asyncio.Redis:
    """The same as :func:`make_redis` for asyncio code."""
    if settings.redis_sentinels:
        sentinel = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            settings.sentinel_addresses, sentinel_kwargs=sentinel_options(settings), **_primary_options(settings)
        )
        client: redis.asyncio.Redis = sentinel.master_for(settings.redis_master_name, redis_class=redis.asyncio.Redis)
        return client
    return redis.asyncio.Redis.from_url(settings.redis_url.get_secret_value(), **redis_options(settings))


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
