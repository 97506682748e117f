"""The exported names are the intended ones (a change here is an API change)."""

from __future__ import annotations

import darkroom.common as common
import darkroom.producer as producer


def test_producer_exports() -> None:
    assert sorted(producer.__all__) == sorted([
        "AsyncClient", "AsyncJobHandle", "Client", "EventType", "Img2ImgJob", "InvalidJobError", "JobCancelled",
        "JobEvent", "JobFailed", "JobHandle", "JobNotFound",
        "JobRecord", "JobResult", "JobStatus", "NotReplicated", "OutputFormat", "RedisUnavailable", "Settings",
        "WaitTimeout",
    ])
    for name in producer.__all__:
        assert getattr(producer, name) is not None


def test_common_exports_resolve() -> None:
    for name in common.__all__:
        assert getattr(common, name) is not None
    assert {"Img2ImgJob", "JobResult", "JobStatus", "Settings", "TASK_IMG2IMG", "ErrorCode"} <= set(common.__all__)
