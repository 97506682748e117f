"""Object-storage addresses and the key layout of a job's outputs.

Layout under a job's output prefix (``s3://bucket/some/prefix``); ``{run}`` names the attempt that
wrote the objects (``{submission}-{attempt}``, its fence), so no object is ever written twice::

    {prefix}/{job_id}/{run}/{index:03d}.{ext}   one object per output image
    {prefix}/{job_id}/{run}/{index:03d}.thumb.webp  its thumbnail (WebP, longest side 256 px) for dashboards;
                                          made from the public image (blurred when blurred), none when blocked
    {prefix}/{job_id}/{run}/{index:03d}.latents.safetensors  its final latents, when the job set output_latents
    {prefix}/{job_id}/result.json         the commit pointer: names the objects of the attempt that published;
                                          replaced only by a newer fence (see darkroom.common.lifecycle)

Pure functions only: no client, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["S3Uri", "output_image_uri", "result_uri", "job_prefix", "thumbnail_uri", "latents_uri",
           "THUMBNAIL_CONTENT_TYPE"]

# AWS bucket naming rules (lower-case, digits, dots, hyphens; 3..63).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class S3Uri:
    """An ``s3://bucket/key`` address."""

    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str, *, allow_empty_key: bool = False) -> S3Uri:
        """Parse ``s3://bucket/key``; raise ValueError saying what is wrong."""
        if not isinstance(uri, str) or not uri.startswith("s3://"):
            raise ValueError(f"must be an s3:// URI (s3://bucket/key), got {uri!r}")
        bucket, _, key = uri[len("s3://") :].partition("/")
        if not _BUCKET.match(bucket):
            raise ValueError(f"bucket name {bucket!r} is not a valid S3 bucket name")
        if not key and not allow_empty_key:
            raise ValueError(f"{uri!r} names a bucket but no object key")
        if "\x00" in key or len(key.encode()) > 1024:
            raise ValueError("object key must be at most 1024 bytes and contain no NUL")
        return cls(bucket, key)

    def join(self, *parts: str) -> S3Uri:
        key = "/".join(p.strip("/") for p in (self.key, *parts) if p.strip("/"))
        return S3Uri(self.bucket, key)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def job_prefix(output_prefix: str, job_id: str) -> S3Uri:
    return S3Uri.parse(output_prefix, allow_empty_key=True).join(job_id)


def _run_prefix(output_prefix: str, job_id: str, run: str) -> S3Uri:
    prefix = job_prefix(output_prefix, job_id)
    return prefix.join(run) if run else prefix


def output_image_uri(output_prefix: str, job_id: str, index: int, ext: str, run: str = "") -> S3Uri:
    """Output ``index`` of the attempt ``run``: ``{prefix}/{job_id}/{run}/{index:03d}.{ext}``."""
    return _run_prefix(output_prefix, job_id, run).join(f"{index:03d}.{ext}")


THUMBNAIL_CONTENT_TYPE = "image/webp"


def thumbnail_uri(output_prefix: str, job_id: str, index: int, run: str = "") -> S3Uri:
    """The thumbnail of output ``index``, beside it: ``{prefix}/{job_id}/{run}/{index:03d}.thumb.webp``."""
    return _run_prefix(output_prefix, job_id, run).join(f"{index:03d}.thumb.webp")


def latents_uri(output_prefix: str, job_id: str, index: int, run: str = "") -> S3Uri:
    """Output ``index``'s final latents (when the job asked for them): ``{run}/{index:03d}.latents.safetensors``."""
    return _run_prefix(output_prefix, job_id, run).join(f"{index:03d}.latents.safetensors")


def result_uri(output_prefix: str, job_id: str) -> S3Uri:
    return job_prefix(output_prefix, job_id).join("result.json")
