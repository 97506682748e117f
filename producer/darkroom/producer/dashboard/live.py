"""Live updates: one Redis subscription and one poller for the whole dashboard, fanned out to browsers.

Job events come from ``darkroom:events``, the channel every status change and progress step is
published on (the SDK's ``wait`` and ``watch`` read the same events), and are passed on as they are.
Views with no events of their own (fleet, queues, augmentation runs, webhooks) are re-read every
``poll_seconds`` while a browser is connected, and a browser is told to refresh one when its
fingerprint changed. Browsers receive them as server-sent events (``GET /events``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

import anyio.to_thread
import redis.asyncio

from darkroom.common.events import ALL_EVENTS_CHANNEL

__all__ = ["LiveHub", "Message", "sse"]

log = logging.getLogger("darkroom.dashboard")

Message = tuple[str, str]
"""(event name, JSON data) as sent to browsers."""
_QUEUE_SIZE = 2000
_RATE_WINDOW = 300.0
_TERMINAL = ("succeeded", "failed", "cancelled")


class LiveHub:
    """Feeds every connected browser; counts recent job outcomes for the queue view's rates."""

    def __init__(self, client: redis.asyncio.Redis, digests: Callable[[], dict[str, str]], poll_seconds: float) -> None:
        self.redis = client
        self.digests = digests
        self.poll_seconds = poll_seconds
        self.started = time.time()
        self._clients: set[asyncio.Queue[Message]] = set()
        self._outcomes: deque[tuple[float, str]] = deque()
        self._last: dict[str, str] = {}

    # -- browsers ------------------------------------------------------------
    def subscribe(self) -> asyncio.Queue[Message]:
        queue: asyncio.Queue[Message] = asyncio.Queue(_QUEUE_SIZE)
        self._clients.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Message]) -> None:
        self._clients.discard(queue)

    def broadcast(self, name: str, data: str) -> None:
        for queue in list(self._clients):
            try:
                queue.put_nowait((name, data))
            except asyncio.QueueFull:  # a browser that stopped reading: start it over
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(("resync", "{}"))

    # -- rates ---------------------------------------------------------------
    def rates(self) -> dict[str, float]:
        """Jobs ended per minute over the last five minutes (or since the dashboard started, if sooner)."""
        now = time.time()
        while self._outcomes and self._outcomes[0][0] < now - _RATE_WINDOW:
            self._outcomes.popleft()
        minutes = max(min(_RATE_WINDOW, now - self.started), 1.0) / 60.0
        return {status: sum(1 for _, s in self._outcomes if s == status) / minutes for status in _TERMINAL}

    @property
    def rate_window_seconds(self) -> float:
        return min(_RATE_WINDOW, time.time() - self.started)

    # -- the two loops -------------------------------------------------------
    async def run(self) -> None:
        """Listen and poll until cancelled (the app's lifespan)."""
        async with anyio.create_task_group() as group:
            group.start_soon(self._listen)
            group.start_soon(self._poll)

    async def _listen(self) -> None:
        delay = 0.5
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(ALL_EVENTS_CHANNEL)
                delay = 0.5
                self.broadcast("resync", "{}")  # anything published while we were away is on the pages
                while True:  # short reads: a quiet channel is not a stalled Redis (socket timeouts apply)
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._on_event(message["data"])
            except (redis.RedisError, OSError) as exc:
                log.warning("event subscription lost (%s); retrying in %.1f s", exc, delay)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    def _on_event(self, raw: bytes | str) -> None:
        data = raw.decode() if isinstance(raw, bytes) else raw
        try:
            kind = json.loads(data).get("type")
        except ValueError:
            return
        if kind in _TERMINAL:
            self._outcomes.append((time.time(), kind))
        self.broadcast("job", data)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            if not self._clients:
                continue
            try:
                current = await anyio.to_thread.run_sync(self.digests)
            except Exception as exc:  # noqa: BLE001 - a Redis blip must not end live updates
                log.warning("reading the fleet for live updates failed: %s", exc)
                continue
            for view, digest in current.items():
                if self._last.get(view) not in (None, digest):
                    self.broadcast(view, "{}")
            self._last = current


async def sse(hub: LiveHub, keepalive: float = 15.0,
              allow: Callable[[str, str], bool] | None = None) -> AsyncIterator[str]:
    """One browser's ``text/event-stream``: the hub's messages (those ``allow`` passes), and a comment line when
    idle."""
    queue = hub.subscribe()
    try:
        yield "retry: 2000\n\n"
        yield "event: hello\ndata: {}\n\n"
        while True:
            try:
                name, data = await asyncio.wait_for(queue.get(), keepalive)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if allow is None or allow(name, data):
                yield f"event: {name}\ndata: {data}\n\n"
    finally:
        hub.unsubscribe(queue)
