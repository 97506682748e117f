from __future__ import annotations

import pytest

from darkroom.common.storage import S3Uri, output_image_uri, result_uri


def test_output_layout() -> None:
    assert str(output_image_uri("s3://out/runs/a", "job1", 2, "png")) == "s3://out/runs/a/job1/002.png"
    assert str(result_uri("s3://out", "job1")) == "s3://out/job1/result.json"
    assert str(result_uri("s3://out/", "job1")) == "s3://out/job1/result.json"


def test_parse() -> None:
    assert S3Uri.parse("s3://bucket/a/b.png") == S3Uri("bucket", "a/b.png")
    with pytest.raises(ValueError, match="no object key"):
        S3Uri.parse("s3://bucket")
    assert S3Uri.parse("s3://bucket", allow_empty_key=True).key == ""
