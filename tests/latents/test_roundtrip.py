"""What is written is what is read, bit for bit: local disk, memory:// and S3 (moto server)."""

import numpy as np
import pytest
import torch
import zstandard

from latents.dataset import LatentIndex
from latents.format import decode_frame, flip_frame, sample_seeds, shard_name
from latents.reader import LatentDataset, LatentLoader
from tests.latents.conftest import SCALE, make_samples, write_dataset


def stored_arrays(url: str) -> dict:
    """Every sample's stored (F, K, C, H, W) array, read through the sample table's offsets."""
    index = LatentIndex.open(url)
    spec, out = index.card.spec, {}
    for row in index.samples.to_pylist():
        shard = index.root.read_bytes(shard_name(row["shard"]))
        member = shard[row["offset"] : row["offset"] + row["size"]]
        frames = [flip_frame(member, f, row["flip_offset"]) for f in range(spec.num_flips)]
        out[row["key"]] = (
            row["label"],
            np.stack([decode_frame(fr, spec, zstandard.ZstdDecompressor()) for fr in frames]),
        )
    return out


def expected_latent(array: np.ndarray, flip: int, seed: int, epoch: int, key_hash: int) -> torch.Tensor:
    """z = (mean + std * eps) * scale, with eps from the documented per-sample generator."""
    s = int(sample_seeds(seed, epoch, np.array([key_hash], dtype=np.uint64))[0])
    g = torch.Generator().manual_seed(s & (2**63 - 1))
    eps = torch.randn(array.shape[2:], generator=g)
    mean, std = (torch.from_numpy(array[flip, k]).float() for k in (0, 1))
    return mean.addcmul(std, eps).mul_(SCALE)


def check_round_trip(url: str, samples: dict, num_workers: int = 0):
    got = stored_arrays(url)
    assert got.keys() == samples.keys()
    for key, (label, array) in samples.items():
        assert got[key][0] == label
        assert np.array_equal(got[key][1].view(np.uint16), array.view(np.uint16)), key  # bit for bit

    # the reader, deterministic mode: posterior means of the unflipped images, scaled
    ds = LatentDataset(url, 10, shuffle=False, random_flip=False, sample_posterior=False)
    batches = list(LatentLoader(ds, num_workers=num_workers))
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == sorted(samples)
    for b in batches:
        for key, label, z in zip(b["keys"], b["labels"].tolist(), b["latents"], strict=True):
            assert label == samples[key][0]
            assert torch.equal(z, torch.from_numpy(samples[key][1][0, 0]).float().mul_(SCALE))

    # the training mode: random flips and posterior samples, reproduced independently
    index = LatentIndex.open(url)
    hashes = dict(zip(index.samples.column("key").to_pylist(), index.sample_column("key_hash").tolist(), strict=True))
    ds = LatentDataset(url, 10, seed=7)
    loader = LatentLoader(ds, num_workers=num_workers)
    loader.epoch = 3
    flips = []
    for b in loader:
        for key, flip, z in zip(b["keys"], b["flips"].tolist(), b["latents"], strict=True):
            assert torch.equal(z, expected_latent(samples[key][1], int(flip), 7, 3, hashes[key])), key
            flips.append(flip)
    assert 0.3 < np.mean(flips) < 0.7


def test_local_disk(tmp_path, samples):
    write_dataset(str(tmp_path / "ds"), samples)
    check_round_trip(str(tmp_path / "ds"), samples, num_workers=2)
    check_round_trip(f"file://{tmp_path}/ds", samples)


def test_memory_filesystem(samples):
    url = "memory://roundtrip/ds"
    write_dataset(url, samples)
    check_round_trip(url, samples)  # memory:// is per process: no DataLoader workers


def test_s3_moto_server(s3_bucket, samples):
    url = f"{s3_bucket}/latents/imagenet256"
    write_dataset(url, samples)
    check_round_trip(url, samples, num_workers=2)


@pytest.mark.parametrize("stored,flips", [("sample", True), ("posterior", False), ("sample", False)])
def test_other_stored_kinds(tmp_path, stored, flips):
    from latents.format import LatentSpec

    spec = LatentSpec((4, 8, 8), stored=stored, flips=flips)
    samples = make_samples(30, spec)
    url = str(tmp_path / "ds")
    write_dataset(url, samples, spec=spec)
    got = stored_arrays(url)
    assert all(np.array_equal(got[k][1], a) for k, (_, a) in samples.items())
    for b in LatentLoader(LatentDataset(url, 5, seed=1)):
        for key, flip, z in zip(b["keys"], b["flips"].tolist(), b["latents"], strict=True):
            array = samples[key][1]
            assert flips or not flip
            if stored == "sample":  # no posterior to sample from: the stored latent itself
                assert torch.equal(z, torch.from_numpy(array[int(flip), 0]).float().mul_(SCALE))


def test_shards_read_as_plain_webdataset(dataset, samples):
    """Interoperability: webdataset sees one sample per key with .latents.zst and .cls members."""
    import webdataset as wds

    from latents.format import LatentSpec

    spec = LatentSpec((4, 8, 8))
    index = LatentIndex.open(dataset)
    flip_offsets = dict(
        zip(index.samples.column("key").to_pylist(), index.sample_column("flip_offset").tolist(), strict=True)
    )
    urls = [f"{dataset}/{name}" for name in index.shards.column("name").to_pylist()]
    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        key = sample["__key__"]
        assert int(sample["cls"]) == samples[key][0]
        frame = flip_frame(sample["latents.zst"], 1, flip_offsets[key])
        assert np.array_equal(decode_frame(frame, spec, zstandard.ZstdDecompressor()), samples[key][1][1])
        seen += 1
    assert seen == len(samples)
