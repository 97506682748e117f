"""The batching policy: which queued requests share the next pipeline call, and when.

Requests with equal :class:`~.call.BatchKey` can share a call; interactive ones fill a call first;
a group runs when it is full, when its oldest request has waited ``max_wait`` or when no other
request can still join. The engine thread (:mod:`.engine`) asks it after every change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .call import BatchKey
    from .engine import Request

__all__ = ["BatchPolicy"]


@dataclass(frozen=True)
class BatchPolicy:
    """When to run which group of compatible requests."""

    max_images: int = 8
    max_wait: float = 0.02
    max_pixels: int | None = None

    def choose(self, pending: Sequence[Request], now: float, can_grow: bool = True
               ) -> tuple[list[Request], float | None]:
        """The group to run now (empty if none is ready) and, if none, when to look again (None: on news).

        ``can_grow``: whether another job may still join (one is being prepared, or a task slot is free).
        """
        groups: dict[BatchKey, list[Request]] = {}
        for request in sorted(pending, key=lambda r: (r.priority, r.enqueued)):  # interactive fill a call first
            groups.setdefault(request.key, []).append(request)
        ready: list[tuple[int, float, list[Request]]] = []
        wake: float | None = None
        for requests in groups.values():
            take = self._fill(requests)
            oldest = min(r.enqueued for r in requests)
            full = len(take) < len(requests) or sum(r.images for r in take) >= self.max_images
            due = now - oldest >= self.max_wait
            if full or due or not can_grow:
                ready.append((min(r.priority for r in take), oldest, take))
            else:
                deadline = oldest + self.max_wait
                wake = deadline if wake is None else min(wake, deadline)
        if ready:
            return min(ready, key=lambda entry: (entry[0], entry[1]))[2], None
        return [], wake

    def _fill(self, requests: Sequence[Request]) -> list[Request]:
        """The longest prefix within the limits; at least the first request (a big job runs alone)."""
        take = [requests[0]]
        images, pixels = requests[0].images, requests[0].pixels
        for request in requests[1:]:
            images += request.images
            pixels += request.pixels
            if images > self.max_images or (self.max_pixels is not None and pixels > self.max_pixels):
                break
            take.append(request)
        return take
