"""Which image a visitor may see, and serving it from object storage through the dashboard.

The browser never gets S3 credentials or addresses: it asks for ``/media/{job}/...`` and the
dashboard looks the object up in the job's own record (never in the request), checks the role,
and streams it. A flagged output (``nsfw``) and a flagged input are hidden from viewers; quarantined
originals are for admins only. A job's input is read only through the same policy as a job's own
references (:class:`~darkroom.common.boundaries.ReferencePolicy`): never outside the allowed buckets,
never under the quarantine prefix, for any role. Only raster image types are served (sniffed from
the bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from darkroom.common.boundaries import ReferencePolicy
from darkroom.common.jobstore import JobRecord
from darkroom.common.results import OutputImage
from darkroom.common.safety import SafetyVerdict

from .auth import Role

__all__ = ["MediaKind", "Picture", "input_object", "input_visible", "output_object", "picture", "sniff_image_type",
           "MAX_MEDIA_BYTES"]

MAX_MEDIA_BYTES = 64 * 1024 * 1024
"""Objects larger than this are not proxied (the dashboard holds one in memory while it sends it)."""


class MediaKind(StrEnum):
    THUMB = "thumb"  # the worker's WebP thumbnail of the public image
    IMAGE = "image"  # the public image (blurred when blurred)
    ORIGINAL = "original"  # the quarantined original of a blurred or blocked image (admins only)


@dataclass(frozen=True)
class Picture:
    """What a page shows for one output: where its pictures are, or why they are hidden."""

    index: int
    thumb_url: str | None
    image_url: str | None
    original_url: str | None
    hidden: str | None  # why nothing is shown: "flagged", "blocked", "no thumbnail"
    verdict: SafetyVerdict | None
    seed: int

    @property
    def flagged(self) -> bool:
        return bool(self.verdict and self.verdict.flagged)


def output_object(output: OutputImage, kind: MediaKind, role: Role) -> str | None:
    """The ``s3://`` address of one output's picture of ``kind`` that ``role`` may see, or None."""
    admin = role is Role.ADMIN
    if output.nsfw and not admin:
        return None
    if kind is MediaKind.THUMB:
        return output.thumbnail_uri
    if kind is MediaKind.IMAGE:
        return output.uri
    return output.quarantine_uri if admin else None


def input_visible(record: JobRecord, role: Role) -> bool:
    """Inputs are shown unless the input precheck flagged them (then to admins only)."""
    if role is Role.ADMIN:
        return True
    verdicts = [record.result.input_safety if record.result else None,
                record.details.input_safety if record.details else None]
    return not any(v is not None and v.flagged for v in verdicts)


def input_object(record: JobRecord, role: Role, policy: ReferencePolicy) -> str | None:
    """The ``s3://`` address of a job's input that ``role`` may see, or None: hidden from viewers when the
    precheck flagged it, and from everyone when ``policy`` puts it out of reach (a job naming a quarantined
    image or a foreign bucket gets nothing through the dashboard). A chained job's input is its upstream's
    output: shown on the upstream job's page, not here."""
    image = record.job.image if record.job is not None else None
    if not isinstance(image, str) or not input_visible(record, role):
        return None
    return image if policy.readable("image", image) else None


def picture(job_id: str, output: OutputImage, role: Role) -> Picture:
    """The URLs (under ``/media``) a page may use for ``output``, given the visitor's role."""
    def url(kind: MediaKind) -> str | None:
        found = output_object(output, kind, role)
        return None if found is None else f"/media/{job_id}/out/{output.index}/{kind.value}"

    hidden = None
    if output.nsfw and role is not Role.ADMIN:
        hidden = "flagged"
    elif output.uri is None:
        hidden = "blocked"
    elif output.thumbnail_uri is None:
        hidden = "no thumbnail"
    return Picture(output.index, url(MediaKind.THUMB), url(MediaKind.IMAGE), url(MediaKind.ORIGINAL), hidden,
                   output.safety, output.seed)


_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


def sniff_image_type(data: bytes) -> str | None:
    """The media type of raster image bytes (PNG, JPEG, WebP, GIF, BMP), or None for anything else."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for magic, media_type in _MAGIC:
        if data.startswith(magic):
            return media_type
    return None
