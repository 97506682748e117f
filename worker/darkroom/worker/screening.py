"""The worker's safety stage: its checker and the operator's settings, applied to one job.

Built once at start-up (:meth:`Screening.from_settings`, which refuses
inconsistent operator limits with a :class:`ConfigurationError`). Per job it
resolves the rules (:meth:`Screening.rules`: the job's threshold within the
operator's limits, its policy or the worker's), prechecks the input when asked
(:meth:`Screening.check_input`, before any model loads or denoising) and judges
the outputs (:meth:`Screening.judge`). What happens to each image is decided by
the verdict (:func:`.safety.public_image`); the runner stores it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from darkroom.common.boundaries import ReferencePolicy
from darkroom.common.boundaries import quarantine_prefix as parse_quarantine_prefix
from darkroom.common.errors import ConfigurationError, ErrorCode, JobError
from darkroom.common.jobs import Img2ImgJob
from darkroom.common.safety import SafetyPolicy, SafetyVerdict
from darkroom.common.storage import S3Uri, output_image_uri

from .registry import ModelRegistry
from .safety import NoChecker, SafetyChecker, build_checker, describe, has_diffusers_safety_checker, judge, precheck
from .safety import resolve_threshold as _resolve_threshold
from .settings import WorkerSettings

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = ["InputFlaggedError", "JobSafety", "Screening"]

log = logging.getLogger(__name__)


class InputFlaggedError(JobError):
    """Raised when the input precheck flags a job's input; carries the verdict."""

    def __init__(self, verdict: SafetyVerdict) -> None:
        super().__init__(ErrorCode.INPUT_FLAGGED, f"the input image was flagged, no denoising was run: {describe(verdict)}")
        self.verdict = verdict


@dataclass(frozen=True)
class JobSafety:
    """The safety rules one job runs under."""

    threshold: float
    policy: SafetyPolicy
    precheck: bool


class Screening:
    """A worker's checker plus the operator's threshold, limits, default policy and quarantine prefix."""

    def __init__(self, checker: SafetyChecker, *, threshold: float = 0.5, threshold_min: float = 0.0,
                 threshold_max: float | None = None, policy: SafetyPolicy = SafetyPolicy.BLUR,
                 quarantine_prefix: str = "s3://darkroom/quarantine", allowed_buckets: Sequence[str] = ()) -> None:
        self.checker = checker
        self._lock = threading.Lock()  # task threads score concurrently; checkers are not all thread-safe
        self.threshold, self.threshold_min = threshold, threshold_min
        self.threshold_max = threshold if threshold_max is None else threshold_max
        self.policy = SafetyPolicy(policy)
        self.quarantine = _check_operator_settings(self.threshold, self.threshold_min, self.threshold_max,
                                                   quarantine_prefix)
        self.references = ReferencePolicy(frozenset(allowed_buckets), self.quarantine)

    @classmethod
    def from_settings(cls, settings: WorkerSettings, registry: ModelRegistry, *, device: str = "cpu") -> Screening:
        """Build the checker the settings name (loading its model once) and check the operator's limits."""
        _check_operator_settings(settings.safety_threshold, settings.safety_threshold_min,
                                 settings.safety_threshold_max, settings.quarantine_prefix)  # before loading a model
        model_dir = settings.safety_model_dir
        if settings.safety_checker == "diffusers" and model_dir is None:
            model_dir = _first_model_with_checker(registry)
        checker = build_checker(settings.safety_checker, model_dir, threads=settings.safety_threads, device=device)
        screening = cls(checker, threshold=settings.safety_threshold, threshold_min=settings.safety_threshold_min,
                        threshold_max=settings.safety_threshold_max, policy=settings.safety_policy,
                        quarantine_prefix=settings.quarantine_prefix, allowed_buckets=settings.allowed_buckets)
        log.info("safety: %s", screening.summary())
        return screening

    def summary(self) -> str:
        """One line for the log, e.g. ``opennsfw 0.1.0+sha256.864bb37bf886, threshold 0.5 ...``."""
        return (f"{self.checker.name} {self.checker.version}, threshold {self.threshold} "
                f"(jobs may set {self.threshold_min}..{self.threshold_max}), default policy {self.policy.value}, "
                f"quarantine {self.quarantine}")

    # -- per job ---------------------------------------------------------------
    def rules(self, job: Img2ImgJob) -> JobSafety:
        """The job's rules; raises ``invalid_job`` for a threshold outside the limits, an impossible precheck or a
        reference under the quarantine prefix, ``bucket_not_allowed`` for a bucket outside the allowlist."""
        threshold = _resolve_threshold(job.safety_threshold, self.threshold, self.threshold_min, self.threshold_max)
        if job.precheck_input and isinstance(self.checker, NoChecker):
            raise JobError(ErrorCode.INVALID_JOB, "precheck_input=True needs a safety checker, and this worker runs "
                                                  "none (DARKROOM_SAFETY_CHECKER=none); submit without it")
        self.references.check_job(job)  # every s3:// reference: bucket allowlist, never the quarantine
        return JobSafety(threshold, job.safety_policy or self.policy, job.precheck_input)

    def check_input(self, image: Image, rules: JobSafety) -> SafetyVerdict:
        """Score the input; raise :class:`InputFlaggedError` when it is flagged."""
        with self._lock:
            verdict = precheck(self.checker, image, rules.threshold)
        if verdict.flagged:
            raise InputFlaggedError(verdict)
        return verdict

    def judge(self, images: Sequence[Image], rules: JobSafety) -> list[SafetyVerdict]:
        """One verdict per output image (scores from the checker, action from the job's policy)."""
        with self._lock:
            scores = self.checker.scores(images)
        return judge(scores, rules.threshold, rules.policy, self.checker)

    def quarantine_uri(self, job_id: str, index: int, ext: str, run: str = "") -> S3Uri:
        """``{quarantine_prefix}/{job_id}/{run}/{index:03d}.{ext}``: where a blurred or blocked original goes."""
        return output_image_uri(str(self.quarantine), job_id, index, ext, run)


def _check_operator_settings(threshold: float, low: float, high: float | None, quarantine_prefix: str) -> S3Uri:
    """Refuse inconsistent limits or a bad quarantine prefix (ConfigurationError); return the prefix."""
    _resolve_threshold(None, threshold, low, threshold if high is None else high)
    try:
        return parse_quarantine_prefix(quarantine_prefix)
    except ValueError as exc:
        raise ConfigurationError(f"DARKROOM_QUARANTINE_PREFIX={quarantine_prefix!r}: {exc}") from None


def _first_model_with_checker(registry: ModelRegistry) -> Path:
    for spec in registry:
        if not spec.is_s3 and has_diffusers_safety_checker(Path(spec.source)):
            return Path(spec.source)
    raise ConfigurationError(
        "safety checker 'diffusers' needs DARKROOM_SAFETY_MODEL_DIR or a local registry model whose folder "
        "includes safety_checker/ and feature_extractor/; none of " + ", ".join(registry.ids) + " does"
    )
