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

import posixpath
import re
import unicodedata
from dataclasses import dataclass

from .errors import DarkroomError

__all__ = ["S3Uri", "InvalidUri", "URI_ALLOWED", "output_image_uri", "result_uri", "job_prefix", "thumbnail_uri",
           "latents_uri", "shorten", "THUMBNAIL_CONTENT_TYPE"]

# AWS bucket naming rules (lower-case, digits, dots, hyphens; 3..63).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
MAX_KEY_BYTES = 1024
URI_ALLOWED = ("s3://bucket/key: an S3 bucket name (3..63 of a-z 0-9 . -), then a key of '/'-separated segments, "
               "none empty, '.' or '..' (no leading '/', no '//'), without control characters or NUL, "
               f"at most {MAX_KEY_BYTES} bytes")


class InvalidUri(DarkroomError, ValueError):  # noqa: N818 - reads as what it is, like ValueError
    """Raised when an ``s3://`` reference is malformed; says why and what is allowed."""

    def __init__(self, uri: object, reason: str) -> None:
        self.value = shorten(uri) if isinstance(uri, str) else uri
        self.reason = reason
        self.allowed = URI_ALLOWED
        super().__init__(f"{self.value!r}: {reason}")


def shorten(value: str, limit: int = 80) -> str:
    """``value`` cut to ``limit`` characters (with an ellipsis), for error messages."""
    return value if len(value) <= limit else value[: limit - 1] + "\u2026"


def _check_key(uri: str, key: str, *, prefix: bool) -> None:
    """Refuse a key an object store could read differently: SeaweedFS folds ``a//b`` to ``a/b``, AWS does not."""
    if len(key.encode()) > MAX_KEY_BYTES:
        raise InvalidUri(uri, f"the key is {len(key.encode())} bytes; at most {MAX_KEY_BYTES}")
    if "\x00" in key or any(unicodedata.category(c) == "Cc" for c in key):
        raise InvalidUri(uri, "the key contains a control character or NUL")
    if key.startswith("/"):
        raise InvalidUri(uri, "the key starts with '/' (an empty first segment)")
    body = key[:-1] if prefix and key.endswith("/") else key
    if not body:
        return
    for segment in body.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidUri(uri, f"the key has an {'empty' if not segment else repr(segment)} segment")


@dataclass(frozen=True)
class S3Uri:
    """An ``s3://bucket/key`` address.

    :meth:`parse` is the one parser for every reference a job or an operator names (inputs,
    outputs, adapters, embeddings, models): it refuses what object stores disagree on. Policy
    checks compare :attr:`segments` (the key normalised) with :meth:`is_under`.
    """

    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str, *, allow_empty_key: bool = False, strict: bool = True) -> S3Uri:
        """Parse ``s3://bucket/key``; raise :class:`InvalidUri` (a ValueError) saying what is wrong.

        ``allow_empty_key`` is for prefixes: ``s3://bucket`` and one trailing ``/`` are accepted.
        ``strict=False`` is for reading what another process stored (records written before these
        rules): only the bucket, a key and no NUL are required. Anything a job will read or write is
        parsed strictly (``validate_job``, the worker, the dashboard's proxy).
        """
        if not isinstance(uri, str) or not uri.startswith("s3://"):
            raise InvalidUri(uri, "must be an s3:// URI (s3://bucket/key)")
        bucket, _, key = uri[len("s3://") :].partition("/")
        if not _BUCKET.fullmatch(bucket):
            raise InvalidUri(uri, f"bucket name {shorten(bucket, 70)!r} is not a valid S3 bucket name")
        if not key and not allow_empty_key:
            raise InvalidUri(uri, "names a bucket but no object key")
        if strict:
            _check_key(uri, key, prefix=allow_empty_key)
        elif "\x00" in key or len(key.encode()) > MAX_KEY_BYTES:
            raise InvalidUri(uri, f"the key holds NUL or is over {MAX_KEY_BYTES} bytes")
        return cls(bucket, key)

    def join(self, *parts: str) -> S3Uri:
        """The key extended by ``parts`` (each may hold several segments); refuses ``..``, ``.`` and ``//``."""
        pieces = [p.strip("/") for p in (self.key, *parts) if p.strip("/")]
        key = "/".join(pieces)
        _check_key(f"s3://{self.bucket}/{key}", key, prefix=False)
        return S3Uri(self.bucket, key)

    @property
    def segments(self) -> tuple[str, ...]:
        """The key normalised as an object store that folds keys would read it: no empty or ``.`` segments,
        ``..`` resolved (never above the bucket)."""
        normal = posixpath.normpath("/" + self.key.replace("\x00", ""))
        return tuple(s for s in normal.split("/") if s)

    def is_under(self, prefix: S3Uri) -> bool:
        """Whether this address is ``prefix`` or lies below it, comparing normalised keys
        (``s3://b/q`` is under ``s3://b//q/``; ``s3://b/q-2`` is not under ``s3://b/q``)."""
        inner = prefix.segments
        return self.bucket == prefix.bucket and self.segments[: len(inner)] == inner

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
