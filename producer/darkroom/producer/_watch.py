"""Following several jobs at once, without I/O: the sync and asyncio clients drive the same :class:`Watch`.

The driver subscribes to every job's channel on one pub/sub connection (telling :meth:`Watch.subscribing`,
again on a new connection after one is lost: :class:`~darkroom.common.jobstore.Outage`), then asks :meth:`Watch.next`
what to do: :class:`Read` the records of some jobs (once the subscriptions are confirmed, so that no
event falls between the read and the subscription; again after :data:`RECHECK_SECONDS` without a
message, in case pub/sub lost one across a reconnect), or :class:`Listen` for the next message. Both
answers go back in and come out as events, each job's in lifecycle order, until every job is terminal.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from darkroom.common.errors import WaitTimeout
from darkroom.common.events import EventType, JobEvent, event_channel
from darkroom.common.jobstore import JobNotFound, JobRecord
from darkroom.common.status import JobStatus

__all__ = ["Listen", "Read", "Watch", "RECHECK_SECONDS"]

RECHECK_SECONDS = 5.0
_DONE = 1 << 62


@dataclass(frozen=True)
class Read:
    """Read these jobs' records (GET or MGET of their keys) and pass them to :meth:`Watch.on_records`."""

    job_ids: list[str]


@dataclass(frozen=True)
class Listen:
    """Wait at most ``timeout`` seconds for the next pub/sub message; pass it (or None) to :meth:`Watch.on_message`."""

    timeout: float


def rank(status: JobStatus, attempt: int) -> int:
    """Where a state falls in a job's life: queued(0) < started(1) < queued(1) < started(2) ... < terminal."""
    if status.is_terminal:
        return _DONE
    return 2 * attempt - (1 if status is JobStatus.STARTED else 0)


class Watch:
    """The events of ``job_ids`` not reported yet; raises WaitTimeout after ``timeout`` seconds."""

    def __init__(
        self, job_ids: Iterable[str], timeout: float | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.job_ids = list(dict.fromkeys(job_ids))
        self._clock = clock
        self._timeout = timeout
        self._deadline = None if timeout is None else clock() + timeout
        self._rank = dict.fromkeys(self.job_ids, -1)
        self._unconfirmed = len(self.job_ids)
        self._read_due = True

    @property
    def channels(self) -> list[str]:
        return [event_channel(job_id) for job_id in self.job_ids]

    @property
    def pending(self) -> list[str]:
        """Jobs not terminal yet."""
        return [job_id for job_id, r in self._rank.items() if r < _DONE]

    @property
    def done(self) -> bool:
        return not self.pending

    def subscribing(self) -> None:
        """A (new) subscription to every channel is on its way: wait for its confirmations, then read again.

        After a lost connection the driver subscribes on a new one; events published meanwhile were
        lost with the old one, and the read that follows the confirmations reports what they said.
        """
        self._unconfirmed = len(self.job_ids)
        self._read_due = True

    def next(self) -> Read | Listen | None:
        """What to do next; None once every job is terminal."""
        pending = self.pending
        if not pending:
            return None
        if self._read_due and not self._unconfirmed:
            return Read(pending)
        if self._deadline is None:
            return Listen(RECHECK_SECONDS)
        remaining = self._deadline - self._clock()
        if remaining <= 0:
            raise WaitTimeout(pending[0], None, f"{len(pending)} job(s) not finished after {self._timeout} s: "
                              + ", ".join(pending[:10]) + (" ..." if len(pending) > 10 else ""))
        return Listen(min(remaining, RECHECK_SECONDS))

    def on_records(self, job_ids: Sequence[str], raws: Sequence[bytes | str | None]) -> list[JobEvent]:
        """Events for what the records show that was not reported yet. Raises JobNotFound for a missing record."""
        self._read_due = False
        events = []
        for job_id, raw in zip(job_ids, raws, strict=True):
            if raw is None:
                raise JobNotFound(job_id)
            event = JobRecord.model_validate_json(raw).as_event()
            if self._accept(event):
                events.append(event)
        return events

    def on_message(self, message: Mapping[str, Any] | None) -> list[JobEvent]:
        """The event a pub/sub message carries, if it is news; None (nothing came) schedules a re-read."""
        if message is None:
            self._read_due = True
            return []
        if message["type"] == "subscribe":
            if self._unconfirmed > 0:
                self._unconfirmed -= 1
            else:  # redis-py reconnected and subscribed again by itself: what was published meanwhile is lost
                self._read_due = True
            return []
        if message["type"] != "message":
            return []
        event = JobEvent.model_validate_json(message["data"])
        return [event] if self._accept(event) else []

    def _accept(self, event: JobEvent) -> bool:
        """Report each change once, never one older than what was reported (a read can overtake messages)."""
        current = self._rank.get(event.job_id)
        if current is None or current >= _DONE:
            return False
        new = rank(event.status, event.attempt)
        fresh = new >= current if event.type is EventType.PROGRESS else new > current
        if fresh:
            self._rank[event.job_id] = new
        return fresh
