"""Queue and task names, and the Celery settings both sides must agree on.

Plain data only: this module does not import Celery, so the contract stays light.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import urlsplit

from .settings import Settings

__all__ = ["TASK_IMG2IMG", "DEFAULT_QUEUE", "PRIORITY_STEPS", "hot_queue", "cold_queue", "broker_list", "priority_keys", "celery_config",
           "sentinel_broker"]

TASK_IMG2IMG = "darkroom.img2img"
DEFAULT_QUEUE = "darkroom.img2img"
PRIORITY_STEPS = tuple(range(10))
"""Broker priorities, 0 served first; kombu's Redis transport keeps one list per priority."""
_PRIORITY_SEP = ":"


def hot_queue(model_id: str) -> str:
    """Jobs for a model that some worker holds resident; only workers holding it consume this queue."""
    return f"darkroom.img2img.hot.{model_id}"


def cold_queue(model_id: str) -> str:
    """The model's general queue: every worker that serves the model consumes it and cold-loads if needed.

    Per model (not one queue for all) so that a worker never takes a job for a model it does not serve,
    and so autoscalers can size each model's pool from its own queues.
    """
    return f"darkroom.img2img.cold.{model_id}"


def broker_list(queue: str, priority: int) -> str:
    """The Redis list that holds ``queue``'s messages of ``priority``: ``queue`` for 0, else ``queue:priority``.

    The same key kombu's Redis transport uses with the ``sep`` and ``priority_steps`` of :func:`celery_config`.
    """
    if priority not in PRIORITY_STEPS:
        raise ValueError(f"priority {priority!r} is not one of {PRIORITY_STEPS[0]}..{PRIORITY_STEPS[-1]}")
    return f"{queue}{_PRIORITY_SEP}{priority}" if priority else queue


def priority_keys(queue: str) -> list[str]:
    """The Redis lists kombu keeps for one queue, one per priority (0 first)."""
    return [broker_list(queue, p) for p in PRIORITY_STEPS]


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery configuration: JSON only, late acks, one job prefetched, Redis priorities 0..9 (0 first).

    With ``redis_sentinels`` the broker is kombu's ``sentinel://`` transport (see :func:`sentinel_broker`).
    """
    config: dict[str, Any] = {
        "broker_url": settings.redis_url.get_secret_value(),
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": DEFAULT_QUEUE,
        "task_create_missing_queues": True,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_seconds,
            "priority_steps": list(PRIORITY_STEPS),
            "sep": _PRIORITY_SEP,
            "queue_order_strategy": "priority",
            "socket_timeout": settings.redis_socket_timeout_seconds,
            "socket_connect_timeout": 5,
        },
    }
    if settings.redis_sentinels:
        config.update(sentinel_broker(settings, config["broker_transport_options"]))
    return config


def sentinel_broker(settings: Settings, transport_options: dict[str, Any]) -> dict[str, Any]:
    """The Celery settings of a broker behind Redis Sentinel: one ``sentinel://`` URL per Sentinel (kombu asks
    them for the primary and reconnects to the new one after a failover), the master name and the Sentinels'
    own password and TLS in the transport options; the primary's password, database and TLS from ``redis_url``.
    """
    url = urlsplit(settings.redis_url.get_secret_value())
    auth = url.netloc.rpartition("@")[0]
    path = url.path or "/0"
    sentinel_kwargs: dict[str, Any] = {"socket_timeout": settings.redis_socket_timeout_seconds,
                                       "socket_connect_timeout": 5}
    if settings.redis_sentinel_password is not None:
        sentinel_kwargs["password"] = settings.redis_sentinel_password.get_secret_value()
    if settings.redis_sentinel_tls:
        sentinel_kwargs["ssl"] = True
    urls = ";".join(f"sentinel://{auth + '@' if auth else ''}{host}:{port}{path}"
                    for host, port in settings.sentinel_addresses)
    options = {**transport_options, "master_name": settings.redis_master_name, "sentinel_kwargs": sentinel_kwargs}
    extra: dict[str, Any] = {"broker_url": urls, "broker_transport_options": options}
    if url.scheme == "rediss":
        extra["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return extra
