"""The latent store on GCS (fake-gcs-server via tests/gcs.py): a dataset written and verified
through an injected 503; the retry policy's view of gcsfs's errors; errors that name the object;
missing credentials as one line.

Two fault injectors: the session's HTTP proxy (a real 503 answer from "GCS", which gcsfs's own
retries meet first), and `FaultyGCS`, gcsfs's filesystem with its `_call` scripted to raise what
gcsfs raises once its own retries give up (so our retry policy is what is tested).
"""

from __future__ import annotations

from typing import ClassVar

import fsspec
import gcsfs
import google.auth.exceptions
import pytest
import requests.exceptions
from gcsfs.retry import ChecksumError, HttpError

from cluster.cli import main
from latents.format import CARD_NAME, shard_name
from latents.storage import Root, StorageError, is_transient
from latents.verify import verify
from tests.latents.conftest import make_samples, write_dataset


class FaultyGCS(gcsfs.GCSFileSystem):
    protocol = ("faulty-gs",)
    script: ClassVar[dict[str, list[int]]] = {}  # object name -> HTTP statuses for its next uploads
    attempts: ClassVar[list[str]] = []

    async def _call(self, method, path, *args, **kwargs):
        data = kwargs.get("data")
        if method == "POST" and isinstance(data, (bytes, bytearray)):
            for name, statuses in FaultyGCS.script.items():
                if f'"name": "{name}"'.encode() in data[:4096]:
                    FaultyGCS.attempts.append(name)
                    if statuses:
                        code = statuses.pop(0)
                        raise HttpError({"code": code, "message": f"injected {code}"})
        return await super()._call(method, path, *args, **kwargs)


fsspec.register_implementation("faulty-gs", FaultyGCS, clobber=True)


@pytest.mark.parametrize(
    "err,transient",
    [
        (HttpError({"code": 503, "message": "Service Unavailable"}), True),
        (HttpError({"code": 500, "message": "Internal Error"}), True),
        (HttpError({"code": 429, "message": "rate limit"}), True),
        (HttpError({"code": 408, "message": "Request Timeout"}), True),
        (requests.exceptions.ProxyError(), True),  # gcsfs's translation of a 502
        (requests.exceptions.ConnectionError("reset"), True),
        (requests.exceptions.ReadTimeout(), True),
        (ChecksumError("md5 mismatch"), True),
        (HttpError({"code": 400, "message": "invalid"}), False),
        (HttpError({"code": 401, "message": "Invalid Credentials"}), False),
        (HttpError({"code": 412, "message": "precondition"}), False),
        (google.auth.exceptions.RefreshError("token expired and refresh failed"), False),
        (google.auth.exceptions.DefaultCredentialsError("no credentials"), False),
        (OSError("Forbidden: bucket/key"), False),  # gcsfs's 403
        (FileNotFoundError("bucket/key"), False),  # gcsfs's 404
        (ValueError("a bug"), False),
    ],
)
def test_gcsfs_errors_are_classified_as_gcsfs_does(err, transient):
    assert is_transient(err) is transient


def test_dataset_on_gcs_through_a_503_is_complete_and_verifies(gcs_bucket, gcs_faults, tmp_path):
    url = f"{gcs_bucket}/ds"
    name = f"ds/{shard_name(1)}"  # the object key (uploads name it in their metadata)
    fault = gcs_faults.fault(name, 503, times=1, method="POST")
    samples = make_samples(40)
    write_dataset(url, samples)
    assert fault.hits == 1  # the upload met the 503 and was retried
    report = verify(url)
    assert report.ok and not report.warnings, report.problems
    write_dataset(str(tmp_path / "local"), samples)
    gcs, local = Root(url), Root(str(tmp_path / "local"))
    for n in [shard_name(i) for i in range(3)] + [CARD_NAME]:
        assert gcs.read_bytes(n) == local.read_bytes(n)


def test_permanent_fault_fails_naming_the_object(gcs_bucket, gcs_faults):
    url = f"{gcs_bucket}/ds"
    name = f"ds/{shard_name(0)}"
    gcs_faults.fault(name, 403, times=None, method="POST")  # never clears, and no retry can help
    with pytest.raises(StorageError, match=rf"writing {url}/{shard_name(0)}: OSError: Forbidden"):
        write_dataset(url, make_samples(20))
    assert not Root(url).exists(CARD_NAME)  # nothing published


@pytest.mark.parametrize("statuses,ok", [([503], True), ([503] * 3, False)])
def test_our_retry_after_gcsfs_gives_up(gcs_bucket, statuses, ok):
    """What gcsfs raises after its own 6 tries: retried by `Root` while transient; when the
    fault stays, the error names the object and the attempts."""
    FaultyGCS.script, FaultyGCS.attempts = {}, []
    root = Root(gcs_bucket.replace("gs://", "faulty-gs://") + "/ds", {"skip_instance_cache": True}, attempts=3)
    key = root.full("x.bin").split("/", 1)[1]  # the object key without the bucket
    FaultyGCS.script = {key: list(statuses)}
    if ok:
        root.publish_bytes("x.bin", b"payload")
        assert root.read_bytes("x.bin") == b"payload" and FaultyGCS.attempts == [key, key]
    else:
        with pytest.raises(StorageError, match=r"writing faulty-gs://.*/ds/x\.bin: failed after 3 attempts: HttpError"):
            root.publish_bytes("x.bin", b"payload")
        assert FaultyGCS.attempts == [key] * 3


def test_missing_credentials_is_one_line(gcs_bucket, monkeypatch, capsys, tmp_path):
    """gcsfs asked for Google's default credentials where there are none: one line, no traceback."""
    monkeypatch.setitem(fsspec.config.conf, "gs", {"token": "google_default"})
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-such-key.json"))
    assert main(["verify", f"{gcs_bucket}/ds"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"{gcs_bucket}/ds: cannot connect to the store: DefaultCredentialsError" in err
    assert "no-such-key.json" in err
