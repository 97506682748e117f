"""What a job may read and write: every ``s3://`` reference it names, checked by one policy.

:func:`job_references` lists every object a job points at (input, IP-Adapter image, prompt
embeddings, adapter and textual-inversion files, output prefix), each already parsed by
:meth:`S3Uri.parse <darkroom.common.storage.S3Uri.parse>`. A :class:`ReferencePolicy` (bucket
allowlist, quarantine prefix) judges each one on its normalised key, so ``s3://b//quarantine/x``
is inside ``s3://b/quarantine`` whatever the object store makes of the double slash.

The same policy runs at submit (the SDK, early), in the worker (authoritative: before any
object is read) and in the dashboard (before an input is proxied). A per-producer policy can
build one :class:`ReferencePolicy` per producer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ErrorCode, FieldError, InvalidJobError, JobError
from .storage import InvalidUri, S3Uri, shorten

if TYPE_CHECKING:
    from .jobs import Img2ImgJob
    from .settings import Settings

__all__ = ["Reference", "ReferencePolicy", "ReferenceRefused", "job_references", "named_references"]


@dataclass(frozen=True)
class Reference:
    """One object (or prefix, when ``writes``) a job names, and the field that names it."""

    field: str
    value: str
    uri: S3Uri
    writes: bool = False


class ReferenceRefused(JobError):
    """Raised when a job names an object outside what its policy allows; carries the field error."""

    def __init__(self, code: ErrorCode, error: FieldError) -> None:
        super().__init__(code, str(error))
        self.error = error


def named_references(job: Img2ImgJob) -> list[tuple[str, str, bool]]:
    """``(field, value, is_prefix)`` of every ``s3://`` reference of ``job``, unparsed (registry adapter ids are
    the operator's, not listed)."""
    image = job.image if isinstance(job.image, str) else None  # a chained input is checked once resolved
    named: list[tuple[str, str | None]] = [("image", image), ("ip_adapter_image", job.ip_adapter_image),
                                           ("prompt_embeds", job.prompt_embeds),
                                           ("negative_prompt_embeds", job.negative_prompt_embeds)]
    named += [(f"adapters.{i}.uri", a.uri) for i, a in enumerate(job.adapters) if a.uri.startswith("s3://")]
    named += [(f"textual_inversions.{i}.uri", t.uri) for i, t in enumerate(job.textual_inversions)]
    found = [(name, value, False) for name, value in named if value is not None]
    if job.output_prefix is not None:
        found.append(("output_prefix", job.output_prefix, True))
    return found


def job_references(job: Img2ImgJob) -> list[Reference]:
    """Every ``s3://`` reference of ``job``, strictly parsed (raises :class:`InvalidUri`; ``validate_job`` has
    already refused such a job). For the output prefix: the folder the job writes, ``{prefix}/{job_id}``."""
    refs = []
    for name, value, prefix in named_references(job):
        uri = S3Uri.parse(value, allow_empty_key=prefix)
        if prefix and job.job_id is not None:
            uri = uri.join(job.job_id)
        refs.append(Reference(name, value, uri, writes=prefix))
    return refs


@dataclass(frozen=True)
class ReferencePolicy:
    """Which objects jobs may name: buckets in ``allowed_buckets`` (empty: any), never under ``quarantine``; with
    ``read_prefixes`` / ``write_prefixes`` (a producer's policy, :mod:`.tenancy`), reads and writes only under one."""

    allowed_buckets: frozenset[str] = frozenset()
    quarantine: S3Uri | None = None
    read_prefixes: tuple[S3Uri, ...] = ()
    write_prefixes: tuple[S3Uri, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> ReferencePolicy:
        """``DARKROOM_ALLOWED_BUCKETS`` and ``DARKROOM_QUARANTINE_PREFIX``."""
        return cls(frozenset(settings.allowed_buckets), quarantine_prefix(settings.quarantine_prefix))

    def refusal(self, ref: Reference) -> ReferenceRefused | None:
        """Why ``ref`` is out of bounds, or None."""
        if self.allowed_buckets and ref.uri.bucket not in self.allowed_buckets:
            return ReferenceRefused(ErrorCode.BUCKET_NOT_ALLOWED, FieldError(
                ref.field, shorten(ref.value), f"bucket {ref.uri.bucket!r} is not allowed (not in the allowed_buckets allowlist)",
                "buckets " + ", ".join(sorted(self.allowed_buckets))))
        if self.quarantine is not None and ref.uri.is_under(self.quarantine):
            where = f"the job would write to {ref.uri}, which lies" if ref.writes else "lies"
            return ReferenceRefused(ErrorCode.INVALID_JOB, FieldError(
                ref.field, shorten(ref.value), f"{where} under the quarantine prefix {self.quarantine}; jobs may "
                "not read or write there", f"any prefix outside {self.quarantine}"))
        return self._prefix_refusal(ref)

    def _prefix_refusal(self, ref: Reference) -> ReferenceRefused | None:
        prefixes = self.write_prefixes if ref.writes else self.read_prefixes
        if not prefixes or any(ref.uri.is_under(p) for p in prefixes):
            return None
        verb = "write to" if ref.writes else "read"
        return ReferenceRefused(ErrorCode.NOT_PERMITTED, FieldError(
            ref.field, shorten(ref.value), f"this producer may not {verb} {ref.uri}",
            "under " + ", ".join(str(p) for p in prefixes)))

    def refusals(self, refs: Iterable[Reference]) -> list[ReferenceRefused]:
        return [r for r in map(self.refusal, refs) if r is not None]

    def check_job(self, job: Img2ImgJob) -> None:
        """Raise the first :class:`ReferenceRefused` of ``job`` (a job error: the job fails with its code)."""
        for refused in self.refusals(job_references(job)):
            raise refused

    def check_submission(self, job: Img2ImgJob) -> None:
        """Raise :class:`InvalidJobError` listing every refused reference of ``job``."""
        refused = self.refusals(job_references(job))
        if refused:
            raise InvalidJobError([r.error for r in refused])

    def readable(self, field: str, value: str) -> bool:
        """Whether an object named by a stored record may be read on its behalf (malformed: no)."""
        try:
            uri = S3Uri.parse(value)
        except InvalidUri:
            return False
        return self.refusal(Reference(field, value, uri)) is None


def quarantine_prefix(value: str) -> S3Uri:
    """The quarantine prefix setting parsed (raises :class:`InvalidUri`)."""
    return S3Uri.parse(value.rstrip("/"), allow_empty_key=True)

