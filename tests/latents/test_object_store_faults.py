"""Faults injected into the object-store commit, through a real s3fs filesystem talking to the
moto S3 server: a lost response after a PUT that landed, throttling, 5xx, and errors that no
retry can fix. Every PUT that reaches the server is counted.

`FaultyS3` is s3fs's S3FileSystem registered under ``faulty-s3://``; it intercepts `_call_s3`,
the one place s3fs sends S3 requests, and follows a script of faults per operation. What it
raises is what s3fs itself raises when its own retries give up (a ClientError translated by
`s3fs.errors.translate_boto_error`, or botocore's transport errors).
"""

from __future__ import annotations

from typing import ClassVar

import botocore.exceptions
import fsspec
import pytest
import s3fs
from s3fs.errors import translate_boto_error

from latents.format import CARD_NAME, shard_name
from latents.storage import Root, StorageError
from latents.verify import verify
from tests.latents.conftest import make_samples, write_dataset


def client_error(code: str, status: int) -> OSError:
    response = {"Error": {"Code": code, "Message": f"injected {code}"}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return translate_boto_error(botocore.exceptions.ClientError(response, "PutObject"))


FAULTS = {
    # the PUT lands, then the connection dies before the answer: s3fs gives up with this
    "lost-response": lambda: botocore.exceptions.ReadTimeoutError(endpoint_url="http://127.0.0.1"),
    "throttled": lambda: client_error("SlowDown", 503),
    "5xx": lambda: client_error("InternalError", 500),
    "reset": lambda: ConnectionResetError(104, "Connection reset by peer"),
    "forbidden": lambda: client_error("AccessDenied", 403),
    "no-credentials": lambda: botocore.exceptions.NoCredentialsError(),
    "bug": lambda: KeyError("a programming error"),
}


class FaultyS3(s3fs.S3FileSystem):
    protocol = ("faulty-s3",)
    script: ClassVar[dict[str, list[str]]] = {}  # S3 key -> faults for its next put_object calls, in order
    puts: ClassVar[list[str]] = []  # keys of every put_object that reached the server
    attempts: ClassVar[list[str]] = []  # keys of every put_object tried

    async def _call_s3(self, method, *args, **kwargs):
        if method != "put_object":
            return await super()._call_s3(method, *args, **kwargs)
        key = kwargs["Key"]
        FaultyS3.attempts.append(key)
        faults = FaultyS3.script.get(key, [])
        fault = faults.pop(0) if faults else None
        if fault is None or fault == "lost-response":
            out = await super()._call_s3(method, *args, **kwargs)
            FaultyS3.puts.append(key)
            if fault is None:
                return out
        raise FAULTS[fault]()


fsspec.register_implementation("faulty-s3", FaultyS3, clobber=True)


@pytest.fixture
def faulty(s3_bucket):
    FaultyS3.script, FaultyS3.puts, FaultyS3.attempts = {}, [], []
    return Root(s3_bucket.replace("s3://", "faulty-s3://") + "/ds", {"skip_instance_cache": True})


def key_of(root: Root, name: str) -> str:
    return root.full(name).split("/", 1)[1]


@pytest.mark.parametrize(
    "faults",
    [["lost-response"], ["throttled", "throttled"], ["5xx"], ["reset", "lost-response"], ["5xx", "throttled"]],
)
def test_transient_faults_commit_once_without_false_failure(faulty, faults):
    key = key_of(faulty, "x.bin")
    FaultyS3.script = {key: list(faults)}
    faulty.publish_bytes("x.bin", b"payload" * 1000)
    assert faulty.read_bytes("x.bin") == b"payload" * 1000
    assert FaultyS3.puts == [key]  # the bytes reached the server exactly once
    tries = len(faults) + 1 - (faults[-1] == "lost-response")  # a lost response is found landed: no retry
    assert FaultyS3.attempts == [key] * tries


@pytest.mark.parametrize(
    "fault,error,match",
    [
        ("forbidden", PermissionError, "injected AccessDenied"),
        ("no-credentials", StorageError, r"writing faulty-s3://.*/x\.bin: NoCredentialsError: Unable to locate"),
        ("bug", KeyError, "a programming error"),
    ],
)
def test_permanent_errors_surface_at_once(faulty, fault, error, match):
    key = key_of(faulty, "x.bin")
    FaultyS3.script = {key: [fault] * 5}
    with pytest.raises(error, match=match):
        faulty.publish_bytes("x.bin", b"payload")
    assert FaultyS3.attempts == [key] and FaultyS3.puts == []  # tried once, never retried


def test_persistent_throttling_fails_naming_the_object_and_the_error(faulty):
    key = key_of(faulty, "x.bin")
    FaultyS3.script = {key: ["throttled"] * 10}
    faulty.attempts = 3
    with pytest.raises(StorageError, match=r"writing faulty-s3://.*/ds/x\.bin: failed after 3 attempts: OSError: .*"):
        faulty.publish_bytes("x.bin", b"payload")
    assert FaultyS3.attempts == [key] * 3 and FaultyS3.puts == []


def test_whole_dataset_through_faults_is_identical_and_each_object_written_once(faulty, s3_bucket):
    samples = make_samples(40)
    names = [shard_name(i) for i in range(3)] + ["samples.parquet", "manifest.parquet", CARD_NAME]
    kinds = ["lost-response", "throttled", "5xx", "reset"]
    FaultyS3.script = {key_of(faulty, n): [kinds[i % 4]] for i, n in enumerate(names)}
    write_dataset(faulty.url, samples, storage_options=faulty.storage_options)
    assert sorted(FaultyS3.puts) == sorted(key_of(faulty, n) for n in names)  # once each, nothing else
    clean = f"{s3_bucket}/clean"
    write_dataset(clean, samples, storage_options={"skip_instance_cache": True})
    clean_root = Root(clean, {"skip_instance_cache": True})
    assert all(faulty.read_bytes(n) == clean_root.read_bytes(n) for n in names)
    report = verify(faulty.url, storage_options=faulty.storage_options)
    assert report.ok and not report.warnings, report.problems
