import json

import numpy as np
import pytest
import zstandard

from latents.format import (
    FORMAT_VERSION,
    DatasetCard,
    LatentSpec,
    UnsupportedFormatError,
    check_key,
    decode_frame,
    encode_sample,
    flip_frame,
    key_hash,
)


def test_spec_shapes_and_sizes():
    spec = LatentSpec((4, 32, 32))
    assert spec.sample_shape == (2, 2, 4, 32, 32) and spec.frame_shape == (2, 4, 32, 32)
    assert spec.raw_sample_bytes == 2 * 2 * 4 * 32 * 32 * 2
    one = LatentSpec((4, 64, 64), stored="sample", flips=False)
    assert one.sample_shape == (1, 1, 4, 64, 64)
    assert spec.samples_per_shard(256 * 2**20) == 256 * 2**20 // 32768
    with pytest.raises(ValueError, match="posterior"):
        LatentSpec((4, 8, 8), stored="mean")
    with pytest.raises(ValueError, match="float16"):
        LatentSpec((4, 8, 8), storage_dtype="float32")


@pytest.mark.parametrize("flips", [True, False])
def test_encode_decode_bit_exact_per_flip(flips):
    spec = LatentSpec((4, 8, 8), flips=flips)
    array = np.random.default_rng(0).standard_normal(spec.sample_shape).astype(np.float16)
    member, flip_offset = encode_sample(array, spec, zstandard.ZstdCompressor(write_checksum=True))
    assert (flip_offset > 0) == flips
    for f in range(spec.num_flips):
        out = decode_frame(flip_frame(member, f, flip_offset), spec, zstandard.ZstdDecompressor())
        assert out.dtype == np.float16 and np.array_equal(out.view(np.uint16), array[f].view(np.uint16))


def test_decode_rejects_other_shape_or_dtype():
    spec = LatentSpec((4, 8, 8), flips=False)
    c = zstandard.ZstdCompressor(write_checksum=True)
    other_shape, _ = encode_sample(np.zeros((1, 2, 4, 8, 4), np.float16), LatentSpec((4, 8, 4), flips=False), c)
    with pytest.raises(ValueError, match=r"shape \(2, 4, 8, 8\)"):
        decode_frame(other_shape, spec, zstandard.ZstdDecompressor())
    header = spec.npy_header.replace(b"<f2", b"<f4")  # same length, other dtype
    wrong_dtype = c.compress(header + np.zeros((2, 4, 8, 8), np.float32).tobytes())
    with pytest.raises(ValueError, match="float16"):
        decode_frame(wrong_dtype, spec, zstandard.ZstdDecompressor())
    with pytest.raises(ValueError, match="sample shape"):
        encode_sample(np.zeros((2, 2, 4, 8, 8)), spec, c)
    with pytest.raises(ValueError, match="NaN"):
        encode_sample(np.full((1, 2, 4, 8, 8), np.nan), spec, c)


def test_keys():
    assert check_key("n01440764/n01440764_10026") == "n01440764/n01440764_10026"
    for bad in ("a.jpg", "", "x" * 89, "sp ace"):
        with pytest.raises(ValueError, match="sample key"):
            check_key(bad)
    assert key_hash("abc") == key_hash("abc") != key_hash("abd")
    # part of the on-disk format (seeds flips and noise): must never change
    assert key_hash("n01440764/n01440764_10026") == 0x22363D7F1C182FC9


def card(**kw) -> DatasetCard:
    fields = {
        "resolution": 256,
        "latent_shape": [4, 32, 32],
        "stored": "posterior",
        "flips": True,
        "vae": "v",
        "scaling_factor": 0.18215,
        "num_classes": 1000,
        "num_samples": 1,
        "num_shards": 1,
        "total_bytes": 1,
        "channel_mean": [0.0] * 4,
        "channel_std": [1.0] * 4,
        "source_fingerprint": "",
        "tool_version": "t",
    }
    fields.update(kw)
    return DatasetCard(**fields)


def test_card_round_trip_and_version_checks():
    c = card()
    assert DatasetCard.from_json(c.to_json()) == c
    data = json.loads(c.to_json())
    data["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(UnsupportedFormatError, match="format version 2 is not supported"):
        DatasetCard.from_json(json.dumps(data), "s3://b/card.json")
    data["format_version"], data["format"] = FORMAT_VERSION, "webdataset"
    with pytest.raises(UnsupportedFormatError, match=r"s3://b/card\.json"):
        DatasetCard.from_json(json.dumps(data), "s3://b/card.json")
