"""Fault injection for tests and chaos runs: a job's prompt asks the worker to fail in a given way.

Off unless the worker runs with ``DARKROOM_FAULT_INJECTION=true`` (never in production). A prompt
containing ``[[fault:KIND]]`` or ``[[fault:KIND@STEP]]`` triggers, at that denoising step (default 1):

- ``kill``        the process SIGKILLs itself (a worker lost mid-job), on every attempt
- ``kill-once``   the same, but only on the job's first attempt (so a takeover can finish it)
- ``oom``         a worker-fatal error, as CUDA out-of-memory would be
- ``transient``   a transient error (storage/broker blip) on the first two attempts
- ``flaky``       a transient error on every attempt up to STEP (``[[fault:flaky@30]]``), at step 1
- ``hang``        sleep 30 s per step (for warm-shutdown and lease tests)
- ``upload``      every upload of the job's outputs fails (a storage error after denoising)

Like cog's ``killed_in_predict.py`` fixtures: one tiny trigger per failure mode, real processes.
"""

from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import dataclass

from darkroom.common.errors import ErrorCode, JobError, TransientError, WorkerFatalError

__all__ = ["Fault", "parse_fault"]

_PATTERN = re.compile(r"\[\[fault:(kill-once|kill|oom|transient|flaky|hang|upload)(?:@(\d+))?\]\]")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int = 1

    def at_step(self, step: int, attempt: int) -> None:
        """Called on every denoising step of the job."""
        if self.kind == "hang":
            time.sleep(30)
        if self.kind == "flaky" and step == 1 and attempt <= self.step:
            raise TransientError(f"injected fault: transient error on attempt {attempt} of {self.step}")
        if step != self.step:
            return
        if self.kind == "kill" or (self.kind == "kill-once" and attempt == 1):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "oom":
            raise WorkerFatalError("injected fault: CUDA out of memory")
        if self.kind == "transient" and attempt <= 2:
            raise TransientError(f"injected fault: transient error on attempt {attempt}")

    def before_upload(self) -> None:
        """Called once before the job's outputs are stored: as storage refusing them would, it fails the job."""
        if self.kind == "upload":
            raise JobError(ErrorCode.OUTPUT_WRITE_FAILED, "cannot write the outputs: injected fault: upload failed")


def parse_fault(prompt: str, enabled: bool) -> Fault | None:
    if not enabled:
        return None
    match = _PATTERN.search(prompt)
    return Fault(match.group(1), int(match.group(2) or 1)) if match else None
