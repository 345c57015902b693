import json

import numpy as np
import pytest
import zstandard

from latents.format import (
    FORMAT_VERSION,
    DatasetCard,
    DatasetError,
    LatentSpec,
    UnsupportedFormatError,
    check_key,
    decode_frame,
    encode_sample,
    flip_frame,
    key_hash,
    sample_flips,
    sample_seeds,
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
    array[:, 1] = np.abs(array[:, 1])  # stds
    member, flip_offset = encode_sample("k", array, spec, zstandard.ZstdCompressor(write_checksum=True))
    assert (flip_offset > 0) == flips
    for f in range(spec.num_flips):
        out = decode_frame(flip_frame(member, f, flip_offset), spec, zstandard.ZstdDecompressor())
        assert out.dtype == np.float16 and np.array_equal(out.view(np.uint16), array[f].view(np.uint16))


def test_decode_rejects_other_shape_or_dtype():
    spec = LatentSpec((4, 8, 8), flips=False)
    c = zstandard.ZstdCompressor(write_checksum=True)
    other_shape, _ = encode_sample("k", np.zeros((1, 2, 4, 8, 4), np.float16), LatentSpec((4, 8, 4), flips=False), c)
    with pytest.raises(ValueError, match=r"shape \(2, 4, 8, 8\)"):
        decode_frame(other_shape, spec, zstandard.ZstdDecompressor())
    header = spec.npy_header.replace(b"<f2", b"<f4")  # same length, other dtype
    wrong_dtype = c.compress(header + np.zeros((2, 4, 8, 8), np.float32).tobytes())
    with pytest.raises(ValueError, match="float16"):
        decode_frame(wrong_dtype, spec, zstandard.ZstdDecompressor())
    with pytest.raises(ValueError, match=r"sample k: shape"):
        encode_sample("k", np.zeros((2, 2, 4, 8, 8)), spec, c)
    with pytest.raises(ValueError, match="sample k: contains NaN"):
        encode_sample("k", np.full((1, 2, 4, 8, 8), np.nan), spec, c)
    with pytest.raises(ValueError, match="sample k: contains NaN or inf"):
        encode_sample("k", np.full((1, 2, 4, 8, 8), 1e6), spec, c)  # overflows float16
    negative = np.ones((1, 2, 4, 8, 8))
    negative[0, 1, 0, 0, 0] = -0.5
    with pytest.raises(ValueError, match="sample k: negative posterior std"):
        encode_sample("k", negative, spec, c)


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
        "autoencoder": {"class": "AutoencoderKL", "config_sha256": "ab"},
        "transform": {"patch": 1, "shift": 0.0, "scale": 0.18215, "norm": "vae"},
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


def test_version_1_card_reads_as_sd_vae_latents():
    data = json.loads(card().to_json())
    del data["autoencoder"], data["transform"]
    data.update(format_version=1, scaling_factor=0.18215)
    old = DatasetCard.from_json(json.dumps(data))
    assert old.format_version == 1 and old.autoencoder == {"class": "AutoencoderKL", "config_sha256": ""}
    assert old.latent_transform.scale == 0.18215 and old.latent_transform.patch == 1
    data["stored"] = "latent"  # version 1 had no deterministic latents
    with pytest.raises(DatasetError, match="stored must be one of posterior, sample, not 'latent'"):
        DatasetCard.from_json(json.dumps(data))
    data["stored"], data["transform"] = "posterior", {}
    with pytest.raises(DatasetError, match=r"unknown fields \['transform'\]"):
        DatasetCard.from_json(json.dumps(data))


def test_card_round_trip_and_version_checks():
    c = card()
    assert DatasetCard.from_json(c.to_json()) == c
    data = json.loads(c.to_json())
    data["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(UnsupportedFormatError, match="format version 3 is not supported"):
        DatasetCard.from_json(json.dumps(data), "s3://b/card.json")
    data["format_version"], data["format"] = FORMAT_VERSION, "webdataset"
    with pytest.raises(UnsupportedFormatError, match=r"s3://b/card\.json"):
        DatasetCard.from_json(json.dumps(data), "s3://b/card.json")


# ---- the SPEC's formulas, computed independently of latents.format ------------------------------

M64 = 2**64 - 1
_IV = [
    0x6A09E667F3BCC908, 0xBB67AE8584CAA73B, 0x3C6EF372FE94F82B, 0xA54FF53A5F1D36F1,
    0x510E527FADE682D1, 0x9B05688C2B3E6C1F, 0x1F83D9ABFB41BD6B, 0x5BE0CD19137E2179,
]  # fmt: skip
_SIGMA = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
    [14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3],
    [11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4],
    [7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8],
    [9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13],
    [2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9],
    [12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11],
    [13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10],
    [6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5],
    [10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0],
]


def _rotr(x: int, n: int) -> int:
    return ((x >> n) | (x << (64 - n))) & M64


def blake2b_rfc7693(message: bytes, digest_size: int) -> bytes:
    """BLAKE2b as written in RFC 7693 (no key), in plain Python: independent of hashlib."""
    h = list(_IV)
    h[0] ^= 0x01010000 ^ digest_size  # parameter block: digest length, key length 0, fanout 1, depth 1
    blocks = [message[i : i + 128] for i in range(0, max(len(message), 1), 128)]
    for i, block in enumerate(blocks):
        m = [int.from_bytes(block.ljust(128, b"\0")[j : j + 8], "little") for j in range(0, 128, 8)]
        t, last = min(len(message), (i + 1) * 128), i == len(blocks) - 1
        v = h + _IV
        v[12] ^= t & M64
        v[14] ^= M64 if last else 0
        for r in range(12):
            s = _SIGMA[r % 10]
            for k, (a, b, c, d) in enumerate(
                [(0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15),
                 (0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14)]
            ):  # fmt: skip
                x, y = m[s[2 * k]], m[s[2 * k + 1]]
                v[a] = (v[a] + v[b] + x) & M64
                v[d] = _rotr(v[d] ^ v[a], 32)
                v[c] = (v[c] + v[d]) & M64
                v[b] = _rotr(v[b] ^ v[c], 24)
                v[a] = (v[a] + v[b] + y) & M64
                v[d] = _rotr(v[d] ^ v[a], 16)
                v[c] = (v[c] + v[d]) & M64
                v[b] = _rotr(v[b] ^ v[c], 63)
        h = [h[j] ^ v[j] ^ v[j + 8] for j in range(8)]
    return b"".join(x.to_bytes(8, "little") for x in h)[:digest_size]


def splitmix64_int(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def test_spec_key_hash_is_blake2b_with_an_8_byte_digest():
    # RFC 7693 appendix A: BLAKE2b-512("abc") starts 0xBA 0x80 0xA5 0x3F: the reference code is right
    assert blake2b_rfc7693(b"abc", 64).hex().startswith("ba80a53f981c4d0d")
    for key in ("n01440764/n01440764_10026", "img/00000", "a", "x" * 88):
        expected = int.from_bytes(blake2b_rfc7693(key.encode(), 8), "little")
        assert key_hash(key) == expected
        # the digest length is a parameter of BLAKE2b: truncating the 64-byte digest is another number
        assert key_hash(key) != int.from_bytes(blake2b_rfc7693(key.encode(), 64)[:8], "little")


def test_spec_per_sample_seed_flip_and_noise_seed():
    keys = [f"img/{i:05d}" for i in range(64)]
    hashes = np.array([key_hash(k) for k in keys], dtype=np.uint64)
    for seed, epoch in ((0, 0), (7, 3), (2**40 + 5, 11)):
        got = sample_seeds(seed, epoch, hashes)
        expected = [splitmix64_int(splitmix64_int(splitmix64_int(seed) ^ epoch) ^ int(h)) for h in hashes]
        assert got.tolist() == expected
        assert sample_flips(got).tolist() == [bool(x >> 63) for x in expected]
    assert 16 < sample_flips(sample_seeds(0, 0, hashes)).sum() < 48  # about half flipped


def test_read_tar_fast_path_agrees_with_tarfile():
    import io
    import tarfile

    from latents.format import _plain_ustar, read_tar

    def archive(fmt, names) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            for i, name in enumerate(names):
                info = tarfile.TarInfo(name)
                info.size = (i + 1) * 300
                tar.addfile(info, io.BytesIO(bytes(range(256)) * 4))
        return buf.getvalue()

    def by_tarfile(data):
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            return [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]

    plain = archive(tarfile.USTAR_FORMAT, ["a.latents.zst", "a.cls", "b/c.cls"])
    assert _plain_ustar(plain) is not None and read_tar(plain) == by_tarfile(plain)
    pax = archive(tarfile.PAX_FORMAT, ["é" * 10 + ".cls", "x.cls"])  # a pax header: tarfile reads it
    assert _plain_ustar(pax) is None and read_tar(pax) == by_tarfile(pax)
    bad = bytearray(plain)
    bad[520] ^= 1  # data of the first member: still a tar
    assert read_tar(bytes(bad)) == by_tarfile(plain)
    bad[3] ^= 1  # a header byte: its checksum no longer matches
    assert _plain_ustar(bytes(bad)) is None
    with pytest.raises(ValueError, match="not a readable tar"):
        read_tar(bytes(bad))
    with pytest.raises(ValueError, match="not a readable tar"):
        read_tar(plain[:700])  # truncated in the first member's data
