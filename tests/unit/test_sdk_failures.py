"""The SDK's object-storage calls say what is wrong and what to do, not botocore's words.

No services run here: with no credentials, boto3 refuses to sign before anything is sent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from darkroom.common.errors import ConfigurationError, ObjectNotFoundError
from darkroom.common.storage_hints import friendly_storage, storage_hint
from darkroom.producer import Client


@pytest.fixture
def nowhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with no .darkroom, no DARKROOM_* variables and no AWS credentials anywhere."""
    for name in list(os.environ):
        if name.startswith(("DARKROOM_", "AWS_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_upload_without_a_darkroom_folder_says_where_it_looked_and_how_to_start(nowhere: Path) -> None:
    # Given a client built in a folder where no services were started, when it uploads
    with Client.from_env() as client, pytest.raises(ConfigurationError) as caught:
        client.upload(b"\x89PNG\r\n", "s3://darkroom/inputs/a.png")
    # Then the message names the settings file it looked for and how to start the services
    message = str(caught.value)
    assert "Unable to locate credentials" not in message
    assert message.startswith("no S3 credentials")
    assert str(nowhere / ".darkroom" / "services.env") in message and "darkroom services up" in message
    assert "DARKROOM_S3_ACCESS_KEY_ID" in message


def test_download_without_credentials_says_the_same(nowhere: Path) -> None:
    with Client.from_env() as client, pytest.raises(ConfigurationError, match="no S3 credentials"):
        client.download("s3://darkroom/outputs/x/000.png")


def test_a_missing_bucket_on_upload_is_named() -> None:
    # (SeaweedFS creates buckets on the first put, so a real server cannot show this; AWS and MinIO answer
    # NoSuchBucket, which the object store raises as ObjectNotFoundError)
    with pytest.raises(ObjectNotFoundError) as caught, friendly_storage("s3://photos/in/a.png", writing=True):
        raise ObjectNotFoundError("s3://photos/in/a.png does not exist")
    assert str(caught.value).startswith("bucket 'photos' does not exist: create it first")
    # a read of a missing object is left as it is
    assert storage_hint(ObjectNotFoundError("s3://photos/in/a.png does not exist"), "s3://photos/in/a.png") is None
