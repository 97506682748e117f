"""Job lifecycle: the states a job moves through and which moves are legal."""

from __future__ import annotations

from enum import StrEnum

from .errors import DarkroomError

__all__ = ["JobStatus", "IllegalTransition"]


class IllegalTransition(DarkroomError, ValueError):
    """Raised when a status change is not allowed (e.g. leaving a terminal state)."""


class JobStatus(StrEnum):
    """Where a job is. ``queued → started → succeeded | failed | cancelled``.

    A started job may go back to ``queued`` (transient error, worker lost) and be
    started again; terminal states never change.
    """

    QUEUED = "queued"
    STARTED = "started"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL

    def can_become(self, new: JobStatus) -> bool:
        return new in _ALLOWED[self]

    def assert_can_become(self, new: JobStatus) -> None:
        if not self.can_become(new):
            raise IllegalTransition(f"a {self.value} job cannot become {new.value}")


_TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
_ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset(
        {JobStatus.STARTED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.QUEUED}
    ),
    JobStatus.STARTED: frozenset(
        {JobStatus.STARTED, JobStatus.QUEUED, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}
