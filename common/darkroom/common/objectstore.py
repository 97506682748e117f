"""A small object-store collaborator over an S3 client.

It speaks in :class:`~darkroom.common.storage.S3Uri` and turns botocore's
errors into Darkroom's three outcomes: not found / too large (the caller
decides what that means), transient (retry later), anything else (storage error).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

from .errors import ObjectNotFoundError, ObjectTooLargeError, StorageError, TransientError
from .storage import S3Uri

__all__ = ["ListedObject", "ObjectStore"]

_NOT_FOUND = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_PRECONDITION = {"412", "PreconditionFailed", "ConditionalRequestConflict"}


class ListedObject(NamedTuple):
    """One object of a listing: where it is, its ETag (without quotes) and its size in bytes."""

    uri: S3Uri
    etag: str
    size: int


class ObjectStore:
    """Get and put whole objects by URI. Thread-safe (boto3 clients are)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def head(self, uri: S3Uri) -> dict[str, Any]:
        with _translated(uri):
            return dict(self.client.head_object(Bucket=uri.bucket, Key=uri.key))

    def tags(self, uri: S3Uri) -> dict[str, str]:
        """The object's tag set as a dict."""
        with _translated(uri):
            response = self.client.get_object_tagging(Bucket=uri.bucket, Key=uri.key)
        return {tag["Key"]: tag["Value"] for tag in response.get("TagSet", [])}

    def list_objects(self, prefix: S3Uri) -> Iterator[ListedObject]:
        """Every object whose key starts with ``prefix.key``, in key order (pages of 1,000 fetched as needed)."""
        paginator = self.client.get_paginator("list_objects_v2")
        with _translated(prefix):
            for page in paginator.paginate(Bucket=prefix.bucket, Prefix=prefix.key):
                for item in page.get("Contents", []):
                    yield ListedObject(S3Uri(prefix.bucket, item["Key"]), str(item.get("ETag", "")).strip('"'),
                                       int(item.get("Size", 0)))

    def exists(self, uri: S3Uri) -> bool:
        try:
            self.head(uri)
        except ObjectNotFoundError:
            return False
        return True

    def get_bytes(self, uri: S3Uri, *, max_bytes: int | None = None) -> bytes:
        """Download an object; with ``max_bytes`` refuse larger ones before downloading."""
        with _translated(uri):
            response = self.client.get_object(Bucket=uri.bucket, Key=uri.key)
            size = int(response.get("ContentLength", 0))
            body = response["Body"]
            try:
                if max_bytes is not None and size > max_bytes:
                    raise ObjectTooLargeError(f"{uri} is {size} bytes; the limit is {max_bytes} bytes")
                data: bytes = body.read() if max_bytes is None else body.read(max_bytes + 1)
            finally:
                body.close()
            if max_bytes is not None and len(data) > max_bytes:
                raise ObjectTooLargeError(f"{uri} is over the limit of {max_bytes} bytes")
            return data

    def get_versioned(self, uri: S3Uri) -> tuple[bytes, str]:
        """An object's bytes and its ETag (for a later ``put_bytes(..., if_match=etag)``)."""
        with _translated(uri):
            response = self.client.get_object(Bucket=uri.bucket, Key=uri.key)
            body = response["Body"]
            try:
                return body.read(), str(response.get("ETag", ""))
            finally:
                body.close()

    def put_bytes(
        self,
        uri: S3Uri,
        data: bytes,
        *,
        content_type: str = "application/octet-stream",
        metadata: Mapping[str, str] | None = None,
        if_absent: bool = False,
        if_match: str | None = None,
        tags: str | None = None,
    ) -> bool:
        """Upload an object. With ``if_absent`` write only if no object exists there, with ``if_match`` only
        if the object there still has that ETag (conditional puts: compare-and-swap); return False when the
        condition did not hold. ``tags`` is an URL-encoded S3 tag set (``a=1&b=2``), sent as ``x-amz-tagging``."""
        kwargs: dict[str, Any] = {
            "Bucket": uri.bucket,
            "Key": uri.key,
            "Body": data,
            "ContentType": content_type,
            "Metadata": dict(metadata or {}),
        }
        if if_absent:
            kwargs["IfNoneMatch"] = "*"
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        if tags:
            kwargs["Tagging"] = tags
        try:
            with _translated(uri):
                self.client.put_object(**kwargs)
        except StorageError as exc:
            if (if_absent or if_match is not None) and getattr(exc, "aws_code", None) in _PRECONDITION:
                return False
            raise
        return True

    def ensure_bucket(self, bucket: str) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.create_bucket(Bucket=bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise


@contextmanager
def _translated(uri: S3Uri) -> Iterator[None]:
    """Map botocore's errors onto Darkroom's error tree."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in _NOT_FOUND or status == 404:
            raise ObjectNotFoundError(f"{uri} does not exist") from None
        if status >= 500 or code in {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"}:
            raise TransientError(f"object storage unavailable for {uri}: {code or status}") from exc
        error = StorageError(f"object storage refused {uri}: {code or status}")
        error.aws_code = code if code else str(status)  # type: ignore[attr-defined]
        raise error from exc
    except BotoCoreError as exc:  # connection refused, timeouts, ...
        raise TransientError(f"object storage unreachable for {uri}: {exc}") from exc
