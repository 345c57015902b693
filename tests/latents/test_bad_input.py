"""Every kind of damage gives an error naming the shard or key, from both `sit verify` and the
reader; the reader's "skip" policy drops and records instead, keeping ranks in lockstep."""

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import zstandard

from latents.dataset import LatentIndex
from latents.format import (
    CARD_NAME,
    MANIFEST_NAME,
    DatasetError,
    IncompleteDatasetError,
    LatentSpec,
    ShardError,
    UnsupportedFormatError,
    shard_name,
)
from latents.reader import LatentDataset, LatentLoader
from latents.storage import Root, StorageError, retry
from latents.verify import verify
from latents.writer import ShardInfo, finalize
from tests.latents.conftest import make_samples, write_dataset


def read_all(url: str, **kw) -> LatentLoader:
    """Read one epoch; checks every yielded batch is full, and that the loader counted them."""
    ld = LatentLoader(LatentDataset(url, 5, **kw))
    ld.batches = list(ld)
    assert len(ld.batches) == len(ld) == 20  # 100 samples, batches of 5: lockstep kept
    assert all(len(b["keys"]) == 5 and b["latents"].shape == (5, 4, 8, 8) for b in ld.batches)  # never short
    return ld


def sample_row(url: str, key: str) -> dict:
    return next(r for r in LatentIndex.open(url).samples.to_pylist() if r["key"] == key)


def patch(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def test_intact_dataset_verifies(dataset):
    report = verify(dataset)
    assert report.ok, report.problems
    assert report.shards_checked == 6 and report.samples_checked == 100


@pytest.mark.slow
def test_verify_in_worker_processes(dataset):
    assert verify(dataset, workers=2, processes=True).ok  # spawned processes (threads below 64 shards)
    (Path(dataset) / shard_name(2)).write_bytes(b"x" * 10240)
    problems = verify(dataset, workers=2, processes=True).problems
    assert any("shards/000002.tar: size 10240 bytes" in p for p in problems), problems


def test_truncated_shard(dataset):
    path = Path(dataset) / shard_name(2)
    path.write_bytes(path.read_bytes()[:5000])
    problems = verify(dataset).problems
    assert any("000002.tar: size 5000 bytes" in p for p in problems)
    assert any("000002.tar: sha256" in p for p in problems)
    with pytest.raises(ShardError, match=r"shards/000002\.tar: truncated"):
        read_all(dataset, shuffle=False)
    skipped = read_all(dataset, shuffle=False, bad_shard="skip")
    assert skipped.skipped and all("000002.tar: truncated" in reason for _, reason in skipped.skipped)
    assert len(skipped.skipped) == skipped.skipped_count < 17
    yielded = [k for b in skipped.batches for k in b["keys"]]
    assert not {k for k, _ in skipped.skipped} & set(yielded)  # the unreadable samples never appear
    assert len(yielded) - len(set(yielded)) == skipped.skipped_count  # replaced by repeats of readable ones


def test_corrupt_latents_bytes(dataset):
    row = sample_row(dataset, "img/00040")
    patch(Path(dataset) / shard_name(row["shard"]), row["offset"] + row["size"] // 2, b"\xde\xad\xbe\xef")
    problems = verify(dataset).problems
    assert any("000002.tar: sha256" in p for p in problems)
    assert any("000002.tar: sample img/00040: does not decode" in p for p in problems)
    with pytest.raises(ShardError, match=r"000002\.tar: sample img/00040"):
        read_all(dataset, shuffle=False, random_flip=False)
    ld = read_all(dataset, shuffle=False, random_flip=False, bad_shard="skip")
    assert [k for k, _ in ld.skipped] == ["img/00040"] and ld.skipped_count == 1
    yielded = [k for b in ld.batches for k in b["keys"]]
    assert "img/00040" not in yielded and yielded.count("img/00041") == 2  # the next readable one stands in
    assert ld.state_dict()["skipped"] == [list(ld.skipped[0])]


def test_corrupt_label_member_is_a_checksum_mismatch(dataset):
    """The reader takes labels from the table and never reads .cls bytes; verify catches it."""
    row = sample_row(dataset, "img/00003")
    cls_data = row["offset"] + row["size"] + (-row["size"] % 512) + 512  # next member's data
    patch(Path(dataset) / shard_name(0), cls_data, b"9")
    problems = verify(dataset).problems
    assert any("000000.tar: sha256" in p for p in problems)
    assert any("sample img/00003: label" in p for p in problems)


def write_crafted(url: str, frames: dict[str, bytes]) -> None:
    """A dataset whose one shard holds hand-made members (as another writer might produce)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, member in frames.items():
            for name, data in ((key + ".latents.zst", member), (key + ".cls", b"1")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        offsets = {m.name: (m.offset_data, m.size) for m in tar}
    root = Root(url)
    root.publish_bytes(shard_name(0), data)
    keys = list(frames)
    info = ShardInfo(0, len(data), hashlib.sha256(data).hexdigest(), keys, [1] * len(keys))
    info.offsets = [offsets[k + ".latents.zst"][0] for k in keys]
    info.sizes = [offsets[k + ".latents.zst"][1] for k in keys]
    info.flip_offsets = [0] * len(keys)
    info.sum_mean = info.sum_sq = info.sum_var = np.zeros(4)
    info.count = 1
    spec = LatentSpec((4, 8, 8), flips=False)
    finalize(root, [info], spec=spec, resolution=64, vae="v", scaling_factor=1.0, num_classes=10)


@pytest.mark.parametrize(
    "bad,message",
    [
        (np.zeros((2, 4, 8, 4), np.float16), r"shape \(2, 4, 8, 8\)"),  # wrong shape
        (np.zeros((2, 4, 16, 4), np.float16), r"shape \(2, 4, 8, 8\)"),  # wrong shape, same size
        (np.zeros((2, 4, 8, 8), np.float32), "float16"),  # wrong dtype
        (np.zeros((2, 4, 8, 8), np.int16), "float16"),  # wrong dtype, same size
    ],
)
def test_wrong_shape_or_dtype(tmp_path, bad, message):
    c = zstandard.ZstdCompressor(write_checksum=True)

    def npy(a):
        buf = io.BytesIO()
        np.save(buf, a)
        return c.compress(buf.getvalue())

    good = np.zeros((2, 4, 8, 8), np.float16)
    url = str(tmp_path / "ds")
    write_crafted(url, {f"k{i}": npy(good) for i in range(9)} | {"k9": npy(bad)})
    problems = verify(url).problems
    assert len(problems) == 1 and "000000.tar: sample k9: does not decode" in problems[0] and "float16" in problems[0]
    with pytest.raises(ShardError, match=f"000000.tar: sample k9: .*{message}"):
        read_all(url, shuffle=False)


def test_unknown_format_version(dataset):
    card = json.loads((Path(dataset) / CARD_NAME).read_text())
    card["format_version"] = 99
    (Path(dataset) / CARD_NAME).write_text(json.dumps(card))
    with pytest.raises(UnsupportedFormatError, match="format version 99 is not supported"):
        LatentDataset(dataset, 5)
    with pytest.raises(UnsupportedFormatError, match="format version 99"):
        verify(dataset)


def test_missing_card_or_manifest(dataset, tmp_path):
    (Path(dataset) / MANIFEST_NAME).unlink()
    with pytest.raises(IncompleteDatasetError, match=r"manifest\.parquet is missing"):
        LatentDataset(dataset, 5)
    (Path(dataset) / CARD_NAME).unlink()
    with pytest.raises(IncompleteDatasetError, match=r"card\.json is missing"):
        LatentDataset(dataset, 5)
    with pytest.raises(IncompleteDatasetError, match="incomplete"):
        verify(dataset)
    with pytest.raises(DatasetError, match="no latent dataset here"):
        LatentDataset(str(tmp_path / "nothing"), 5)


def test_missing_shard_and_stray_files(dataset):
    (Path(dataset) / shard_name(4)).unlink()
    (Path(dataset) / "shards" / "000007.tar").write_bytes(b"x")
    (Path(dataset) / "shards" / "000001.tar.tmp-abc").write_bytes(b"x")
    report = verify(dataset)
    assert any("000004.tar: missing (17 samples)" in p for p in report.problems)
    assert any("000007.tar: shard file not in the manifest" in p for p in report.problems)
    assert [w for w in report.warnings if "000001.tar.tmp-abc: leftover temporary file" in w]
    assert not any("tmp-abc" in p for p in report.problems)
    assert any("tmp-abc: leftover temporary" in p for p in verify(dataset, strict=True).problems)
    with pytest.raises(ShardError, match=r"000004\.tar: shard is missing"):
        read_all(dataset)
    ld = read_all(dataset, bad_shard="skip")  # a whole shard gone: its samples are replaced, no batch is short
    assert ld.skipped_count == len(ld.skipped) >= 1


def test_inconsistent_index(dataset):
    card = json.loads((Path(dataset) / CARD_NAME).read_text())
    card["num_samples"] = 99
    (Path(dataset) / CARD_NAME).write_text(json.dumps(card))
    with pytest.raises(DatasetError, match="sample table has 100 rows, card says 99"):
        LatentDataset(dataset, 5)


def test_retry_is_bounded_and_names_what_failed():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("reset by peer")
        return "ok"

    assert retry(flaky, "reading s3://b/x", attempts=3, base_delay=0.01) == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(StorageError, match=r"reading s3://b/x: failed after 2 attempts: ConnectionError"):
        retry(flaky, "reading s3://b/x", attempts=2, base_delay=0.01)

    def missing():
        calls.append(1)
        raise FileNotFoundError("x")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        retry(missing, "reading", attempts=5, base_delay=0.01)
    assert len(calls) == 1  # permanent errors are not retried


@pytest.mark.slow
def test_unreachable_store_gives_an_error_naming_the_shard(tmp_path):
    """The object store goes away mid-job: bounded retries, then an error naming the object (a shard, or
    samples.parquet: a worker reads its shards' sample rows when its epoch starts)."""
    import os

    from tests.moto_s3 import start_moto_server

    proc, endpoint = start_moto_server()
    saved = os.environ.get("AWS_ENDPOINT_URL")
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="t", AWS_SECRET_ACCESS_KEY="t")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    try:
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True).mkdir("gone-bucket")
        url = "s3://gone-bucket/ds"
        write_dataset(url, make_samples(20), storage_options={"skip_instance_cache": True})
        fast_fail = {"skip_instance_cache": True, "config_kwargs": {"retries": {"max_attempts": 1}}}
        ds = LatentDataset(url, 5, retries=2, storage_options=fast_fail)
        proc.terminate()
        proc.wait(10)
        named = r"s3://gone-bucket/ds/(shards/00000\d\.tar|samples\.parquet): unreadable: .*2 attempts"
        with pytest.raises(DatasetError, match=named):
            list(LatentLoader(ds))
    finally:
        proc.kill()
        if saved is None:
            os.environ.pop("AWS_ENDPOINT_URL")
        else:
            os.environ["AWS_ENDPOINT_URL"] = saved


def test_skip_record_is_bounded_and_resumes(dataset, monkeypatch):
    import latents.reader

    monkeypatch.setattr(latents.reader, "MAX_SKIP_RECORD", 4)
    (Path(dataset) / shard_name(1)).unlink()
    ld = LatentLoader(LatentDataset(dataset, 5, shuffle=False, bad_shard="skip"))
    head = [b for _, b in zip(range(8), ld, strict=False)]
    state = ld.state_dict()
    assert len(state["skipped"]) == 4 < state["skipped_count"] <= 17
    resumed = LatentLoader(LatentDataset(dataset, 5, shuffle=False, bad_shard="skip"))
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert len(head) + len(tail) == 20 and resumed.skipped_count == 17 and len(resumed.skipped) == 4
