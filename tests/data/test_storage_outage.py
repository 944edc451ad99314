"""S3 errors by kind: a missing object is bad data (quarantined), an unavailable endpoint is an outage.

A scripted client stands in for boto3 here (5xx, SlowDown and timeouts cannot be asked of
moto_server); tests/orchestration/test_retrain_reliability.py stops a real moto_server.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, ReadTimeoutError
from PIL import Image

from cpcsam.data import manifest, storage
from cpcsam.data.records import Quarantine
from cpcsam.data.sources.common import load_image_info
from cpcsam.errors import CpcSamError, DataError


def client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


def png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class ScriptedS3:
    """get_object answers from a script: an exception to raise or bytes to return, one per call."""

    def __init__(self, *outcomes) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0

    def get_object(self, Bucket: str, Key: str):  # noqa: N803 - boto3's names
        self.calls += 1
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return {"Body": io.BytesIO(outcome)}


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CPCSAM_S3_ATTEMPTS", "4")
    monkeypatch.setenv("CPCSAM_S3_BACKOFF_S", "0")

    def install(*outcomes) -> ScriptedS3:
        client = ScriptedS3(*outcomes)
        monkeypatch.setattr(storage, "s3_client", lambda: client)
        return client

    return install


TRANSIENT = [
    client_error("SlowDown", 503), client_error("InternalError", 500), client_error("ServiceUnavailable", 503),
    client_error("Throttling", 400), client_error("RequestTimeout", 400), client_error("Whatever", 502),
    EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), ReadTimeoutError(endpoint_url="http://127.0.0.1:1"),
    ConnectionResetError("reset by peer"),
]


@pytest.mark.parametrize("error", TRANSIENT, ids=lambda e: type(e).__name__ + ":" + str(e)[:20])
def test_a_transient_error_is_retried_and_then_succeeds(scripted, error) -> None:
    client = scripted(error, error, b"payload")
    assert storage.read_bytes("s3://bkt/a.png") == b"payload"
    assert client.calls == 3


@pytest.mark.parametrize("error", TRANSIENT, ids=lambda e: type(e).__name__ + ":" + str(e)[:20])
def test_a_lasting_outage_is_storage_unavailable_never_a_data_error(scripted, error) -> None:
    client = scripted(error)
    with pytest.raises(storage.StorageUnavailable, match="after 4 attempt") as failed:
        storage.read_bytes("s3://bkt/images/a.png")
    assert client.calls == 4 and "s3://bkt/images/a.png" in str(failed.value)
    assert not isinstance(failed.value, CpcSamError), "a pipeline step must exit 1 (retryable), not 2"


@pytest.mark.parametrize("error", [client_error("AccessDenied", 403), client_error("NoSuchBucket", 404),
                                   client_error("InvalidAccessKeyId", 403), NoCredentialsError()],
                         ids=lambda e: str(e)[:30])
def test_a_refused_endpoint_fails_at_once(scripted, error) -> None:
    client = scripted(error)
    with pytest.raises(storage.StorageUnavailable, match="refused"):
        storage.read_bytes("s3://bkt/a.png")
    assert client.calls == 1


@pytest.mark.parametrize("code", ["NoSuchKey", "404", "NotFound"])
def test_a_missing_object_is_a_data_error_at_once(scripted, code) -> None:
    client = scripted(client_error(code, 404))
    with pytest.raises(DataError, match="file not found"):
        storage.read_bytes("s3://bkt/a.png")
    assert client.calls == 1


def test_sources_quarantine_a_missing_image_but_let_an_outage_through(scripted) -> None:
    quarantine = Quarantine()
    scripted(client_error("NoSuchKey", 404))
    assert load_image_info("s3://bkt/images", "a.png", quarantine, None, "1") is None
    assert quarantine.counts() == {"missing_image": 1}

    scripted(client_error("SlowDown", 503))
    with pytest.raises(storage.StorageUnavailable):
        load_image_info("s3://bkt/images", "b.png", quarantine, None, "2")
    assert quarantine.counts() == {"missing_image": 1}, "nothing quarantined for the outage"

    scripted(client_error("SlowDown", 503), png())
    assert load_image_info("s3://bkt/images", "c.png", quarantine, None, "3")[1:3] == (6, 4)


def test_an_outage_reading_a_manifest_is_not_reported_as_a_bad_file(scripted) -> None:
    scripted(client_error("InternalError", 500))
    with pytest.raises(storage.StorageUnavailable):
        manifest.load_manifest("s3://bkt/manifest.parquet")


def test_a_per_object_client_error_stays_a_data_error(scripted) -> None:
    scripted(client_error("InvalidObjectState", 403))  # an archived object: that file cannot be read
    with pytest.raises(DataError, match="cannot read"):
        storage.read_bytes("s3://bkt/a.png")
