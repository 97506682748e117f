"""Celery task messages written straight into the Redis broker, as kombu's Redis transport stores them.

Celery's ``send_task`` spends a few milliseconds per message (routing, signals, ``saferepr`` of the
arguments, one round trip). A producer that enqueues thousands of jobs builds the same message
itself and pipelines it: this module is that message, nothing else. What a worker reads::

    LPUSH {queue}            (priority 0)     the JSON envelope below
    LPUSH {queue}:{priority} (priority 1..9)  (kombu: sep ":", priority_steps 0..9; see queues.broker_list)

    {"body": base64(JSON [args, kwargs, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]),
     "content-encoding": "utf-8", "content-type": "application/json",
     "headers": {Celery task protocol 2: lang, task, id, root_id, argsrepr, origin, ...},
     "properties": {"correlation_id": id, "reply_to": "", "delivery_mode": 2, "priority": p,
                    "delivery_info": {"exchange": "", "routing_key": queue},
                    "body_encoding": "base64", "delivery_tag": a fresh uuid4}}

It follows celery/app/amqp.py ``as_task_v2`` and kombu/transport/virtual ``basic_publish`` /
kombu/transport/redis.py ``_put``; a unit test compares it with a message that ``send_task`` wrote.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from collections.abc import Sequence
from typing import Any

from pydantic_core import to_json

from .queues import broker_list

__all__ = ["ARGSREPR_MAX", "UNACKED", "UNACKED_INDEX", "message_task_id", "origin", "redelivered", "restore_list",
           "task_message"]

UNACKED = "unacked"
"""kombu's hash of delivered, unacknowledged messages: delivery tag -> JSON [message, exchange, routing key]."""
UNACKED_INDEX = "unacked_index"
"""kombu's sorted set: delivery tag -> when it was delivered (epoch seconds)."""

ARGSREPR_MAX = 1024
"""Celery's ``argsrepr_maxsize``: the argument summary workers log is cut to this many characters."""

_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def origin() -> str:
    """Who sent the message, as Celery names an anonymous sender: ``gen{pid}@{host}``."""
    return f"gen{os.getpid()}@{socket.gethostname()}"


def task_message(
    task: str, task_id: str, args: Sequence[Any], *, queue: str, priority: int, sender: str
) -> tuple[str, bytes]:
    """The Redis list to LPUSH onto and the JSON envelope of one task message (protocol 2, JSON body).

    The JSON is compact (pydantic-core's encoder, a few times faster than ``json.dumps``): the same
    values as kombu writes, without the spaces after separators.
    """
    body = to_json([list(args), {}, _EMBED])
    envelope = {
        "body": base64.b64encode(body).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": _headers(task, task_id, args, sender),
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": priority,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return broker_list(queue, priority), to_json(envelope)


def _headers(task: str, task_id: str, args: Sequence[Any], sender: str) -> dict[str, Any]:
    argsrepr = repr(list(args))
    if len(argsrepr) > ARGSREPR_MAX:
        argsrepr = argsrepr[: ARGSREPR_MAX - 3] + "..."
    return {
        "lang": "py",
        "task": task,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": argsrepr,
        "kwargsrepr": "{}",
        "origin": sender,
        "ignore_result": None,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }


def message_task_id(message: dict[str, Any]) -> str | None:
    """The task id (the job id) of a message as kombu stores it."""
    headers = message.get("headers") or {}
    value = headers.get("id") or (message.get("properties") or {}).get("correlation_id")
    return str(value) if value else None


def restore_list(routing_key: str, message: dict[str, Any]) -> str:
    """The list kombu restores an unacknowledged message to (its priority's list; RPUSH = next out)."""
    priority = int((message.get("properties") or {}).get("priority") or 0)
    return broker_list(routing_key, min(max(priority, 0), 9))


def redelivered(message: dict[str, Any]) -> dict[str, Any]:
    """The message marked as kombu marks a restored one."""
    message.setdefault("headers", {})["redelivered"] = True
    message.setdefault("properties", {}).setdefault("delivery_info", {})["redelivered"] = True
    return message


# Queue lists of every img2img queue (hot, cold, per priority) match this pattern.
QUEUE_LIST_PATTERN = "darkroom.img2img*"


def unacked_entry(raw: bytes | str) -> tuple[dict[str, Any], str, str]:
    """A value of kombu's ``unacked`` hash: (message, exchange, routing key)."""
    message, exchange, routing_key = json.loads(raw)
    return message, str(exchange), str(routing_key)


def restored(raw_unacked: bytes | str) -> tuple[str, str] | None:
    """Where and what to RPUSH to restore an ``unacked`` entry as kombu does: (list, message JSON).
    None when the entry is unreadable."""
    try:
        message, _exchange, routing_key = unacked_entry(raw_unacked)
    except (ValueError, TypeError):
        return None
    return restore_list(routing_key, message), json.dumps(redelivered(message))


def queued_task_id(raw: bytes | str, *, unacked: bool = False) -> str | None:
    """The job id of a message as it sits in a queue list (or, ``unacked``, in the unacked hash);
    None when it is not a readable task message."""
    try:
        message = unacked_entry(raw)[0] if unacked else json.loads(raw)
        return message_task_id(message) if isinstance(message, dict) else None
    except (ValueError, TypeError, IndexError, KeyError, AttributeError):
        return None
