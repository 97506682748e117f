"""The safety contract: what a job may ask for and what every output image records.

A job picks a :class:`SafetyPolicy` (what to do with a flagged image); the
worker records a :class:`SafetyVerdict` per image (checker, version, score,
threshold, flag, :class:`SafetyAction`). The checkers themselves live in
``darkroom.worker.safety``; this module is pure pydantic so producers can read
verdicts without the worker's dependencies.

Threshold semantics: an image is flagged when ``score >= threshold``, except
that a threshold of exactly 1.0 flags nothing. So 0 flags every image, 1 none.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["SafetyAction", "SafetyPolicy", "SafetyVerdict"]


class SafetyPolicy(StrEnum):
    """What to do with a flagged image (chosen per job)."""

    FLAG = "flag"  # store it as made, mark it
    BLUR = "blur"  # store a blurred copy; the original only under the quarantine prefix
    BLOCK = "block"  # store nothing public; the original only under the quarantine prefix


class SafetyAction(StrEnum):
    """What was done with one image."""

    NONE = "none"  # not flagged (or not checked): stored as made
    FLAGGED = "flagged"  # flagged, stored as made, marked
    BLURRED = "blurred"  # flagged, a blurred copy stored; the original only in quarantine
    BLOCKED = "blocked"  # flagged, nothing public; the original only in quarantine

    @property
    def quarantines(self) -> bool:
        """Whether the original goes to the quarantine prefix instead of the public one."""
        return self in (SafetyAction.BLURRED, SafetyAction.BLOCKED)


class SafetyVerdict(BaseModel):
    """One image's safety record: who scored it, the score, the bar, the flag, the action."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    checker: str = Field(description="Checker name: opennsfw, diffusers or none.")
    version: str = Field(description="Checker version (package version + weights sha256 prefix).")
    score: float | None = Field(None, ge=0.0, le=1.0, description="Probability-like unsafe score; None if unchecked.")
    threshold: float | None = Field(None, ge=0.0, le=1.0, description="Threshold applied; None if unchecked.")
    flagged: bool | None = Field(None, description="score >= threshold (threshold 1 flags nothing); None if unchecked.")
    action: SafetyAction = Field(SafetyAction.NONE, description="What was done with the image.")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        checked = self.score is not None
        if checked != (self.threshold is not None) or checked != (self.flagged is not None):
            raise ValueError("score, threshold and flagged are all set (checked) or all None (unchecked)")
        if bool(self.flagged) == (self.action is SafetyAction.NONE):
            raise ValueError(f"action {self.action.value!r} contradicts flagged={self.flagged}")
        return self
