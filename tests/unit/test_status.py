from __future__ import annotations

import pytest

from darkroom.common.status import IllegalTransition, JobStatus


def test_terminal_states() -> None:
    assert {s for s in JobStatus if s.is_terminal} == {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}


@pytest.mark.parametrize("terminal", [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED])
@pytest.mark.parametrize("new", list(JobStatus))
def test_terminal_states_never_change(terminal: JobStatus, new: JobStatus) -> None:
    with pytest.raises(IllegalTransition):
        terminal.assert_can_become(new)


def test_the_normal_path_and_a_requeue_are_legal() -> None:
    JobStatus.QUEUED.assert_can_become(JobStatus.STARTED)
    JobStatus.STARTED.assert_can_become(JobStatus.QUEUED)
    JobStatus.STARTED.assert_can_become(JobStatus.SUCCEEDED)
    assert not JobStatus.QUEUED.can_become(JobStatus.SUCCEEDED)
