"""Large tiny-latent datasets in seconds, for scale tests and benchmarks.

`write_shard` spends ~100 us of Python per sample (tar headers, checks, statistics); building
millions of samples that way takes many minutes. Here each shard's tar bytes are laid out with
numpy - the same bytes `write_shard` writes for the same samples (checked by
tests/latents/test_scale.py) - then published with `Root.publish_bytes`; the index is written by
the real `latents.writer.finalize`, streaming. Samples: key ``s{i:09d}``, label
``100 + i % 900`` (three digits: fixed-size members), one sampled 1x1x1 latent, no flip.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import zstandard

from latents.format import (
    LABEL_SUFFIX,
    LATENTS_SUFFIX,
    TAR_BLOCK,
    TAR_RECORD,
    ZSTD_LEVEL,
    LatentSpec,
    encode_sample,
    label_bytes,
    shard_name,
    tar_header,
)
from latents.storage import Root
from latents.writer import ShardInfo, finalize

SPEC = LatentSpec((1, 1, 1), stored="sample", flips=False)
NUM_CLASSES = 1000
KEY_DIGITS = 9
STRIDE = 4 * TAR_BLOCK  # per sample: latents header + data block, label header + data block


def key(i: int) -> str:
    return f"s{i:0{KEY_DIGITS}d}"


def label(i: np.ndarray) -> np.ndarray:
    return 100 + i % 900


def _frames() -> tuple[np.ndarray, list[bytes]]:
    """Latent values whose compressed members all have one size (fixed offsets), and the members."""
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True, write_content_size=True)
    values = (np.arange(256, dtype=np.float32) - 128) / 16
    members = [encode_sample("k", np.full(SPEC.sample_shape, v, np.float16), SPEC, compressor)[0] for v in values]
    size = max(set(map(len, members)), key=[len(m) for m in members].count)
    keep = [i for i, m in enumerate(members) if len(m) == size]
    return values[keep].astype(np.float16), [members[i] for i in keep]


VALUES, MEMBERS = _frames()


def _headers(first: int, n: int, suffix: str, size: int) -> np.ndarray:
    """(n, 512) ustar headers of members ``key(i) + suffix`` for i in [first, first + n)."""
    template = np.frombuffer(tar_header(key(0) + suffix, size), np.uint8)
    base = int(bytes(template[148:154]), 8) - int(template[1 : 1 + KEY_DIGITS].sum())
    i = np.arange(first, first + n, dtype=np.int64)
    digits = (i[:, None] // 10 ** np.arange(KEY_DIGITS - 1, -1, -1)) % 10 + ord("0")  # (n, 9) ascii
    out = np.tile(template, (n, 1))
    out[:, 1 : 1 + KEY_DIGITS] = digits
    checksum = base + digits.sum(axis=1)
    for k in range(6):  # "%06o\0"
        out[:, 148 + k] = ord("0") + (checksum >> (3 * (5 - k))) % 8
    out[:, 154] = 0
    return out


def build_shard(index: int, first: int, n: int) -> tuple[bytes, ShardInfo]:
    """Shard ``index`` holding samples [first, first + n): its bytes and `ShardInfo`."""
    i = np.arange(first, first + n, dtype=np.int64)
    which = i % len(MEMBERS)
    size = len(MEMBERS[0])
    body = np.zeros((n, STRIDE), np.uint8)
    body[:, :TAR_BLOCK] = _headers(first, n, LATENTS_SUFFIX, size)
    body[:, TAR_BLOCK : TAR_BLOCK + size] = np.frombuffer(b"".join(MEMBERS), np.uint8).reshape(-1, size)[which]
    body[:, 2 * TAR_BLOCK : 3 * TAR_BLOCK] = _headers(first, n, LABEL_SUFFIX, 3)
    labels = label(i)
    for k in range(3):
        body[:, 3 * TAR_BLOCK + k] = ord("0") + labels // 10 ** (2 - k) % 10
    end = n * STRIDE + 2 * TAR_BLOCK
    data = body.tobytes() + b"\0" * (end - n * STRIDE + (-end % TAR_RECORD))
    v = VALUES[which].astype(np.float64)
    info = ShardInfo(
        index,
        len(data),
        hashlib.sha256(data).hexdigest(),
        keys=[key(j) for j in range(first, first + n)],
        labels=labels.tolist(),
        offsets=(np.arange(n) * STRIDE + TAR_BLOCK).tolist(),
        sizes=[size] * n,
        flip_offsets=[0] * n,
        sum_mean=np.array([v.sum()]),
        sum_sq=np.array([(v**2).sum()]),
        sum_var=np.zeros(1),
        count=n,
    )
    return data, info


def samples(first: int, n: int) -> Iterator[tuple[str, int, np.ndarray]]:
    """The same samples as (key, label, array) triples, for `latents.writer.write_shard`."""
    for i in range(first, first + n):
        yield key(i), int(label(np.int64(i))), np.full(SPEC.sample_shape, VALUES[i % len(MEMBERS)], np.float16)


def write_dataset(url: str, n: int, per_shard: int, storage_options: dict | None = None):
    """Write a complete dataset of ``n`` samples, ``per_shard`` a shard; returns the card."""
    root = Root(url, storage_options)

    def shards() -> Iterator[ShardInfo]:
        for s, first in enumerate(range(0, n, per_shard)):
            data, info = build_shard(s, first, min(per_shard, n - first))
            root.publish_bytes(shard_name(s), data)
            yield info

    return finalize(root, shards(), spec=SPEC, resolution=8, vae="none", num_classes=NUM_CLASSES)


assert label_bytes(999) == b"999"  # the label member size assumed above
