"""`latents.keys.HashLog.repeated`: the external hash partition finds exactly the repeated hashes."""

from __future__ import annotations

import numpy as np

import latents.keys as keys
from latents.keys import HashLog


def hashes_with_planted_duplicates(seed: int = 0) -> list[np.ndarray]:
    """Random 64-bit hashes in several appends, with duplicates planted far apart (other appends,
    other read chunks), at the extremes of the value range and repeated up to 4 times."""
    rng = np.random.default_rng(seed)
    parts = [rng.integers(0, 2**64, size=n, dtype=np.uint64, endpoint=False) for n in (900, 1300, 700, 1100)]
    planted = np.concatenate([rng.choice(parts[0], 25), rng.choice(parts[2], 15), parts[1][:5]])
    extremes = np.array([0, 0, 2**64 - 1, 2**64 - 1, 2**63, 2**63 - 1, 2**63 - 1], dtype=np.uint64)
    return [*parts, planted, parts[1][:3], extremes]


def reference(parts: list[np.ndarray]) -> np.ndarray:
    values, counts = np.unique(np.concatenate(parts), return_counts=True)
    return values[counts > 1]


def repeated_of(parts: list[np.ndarray]) -> np.ndarray:
    with HashLog() as log:
        for p in parts:
            log.add(p)
        return log.repeated()


def test_many_buckets_find_exactly_the_repeated_hashes(monkeypatch):
    monkeypatch.setattr(keys, "HASHES_PER_BUCKET", 64)  # ~4,000 hashes: 64 buckets, the MAX_BUCKETS cap not hit
    monkeypatch.setattr(keys, "HASHES_PER_READ", 97)  # ~42 scatter chunks, duplicates in different ones
    parts = hashes_with_planted_duplicates()
    expected = reference(parts)
    assert len(expected) >= 45  # the planted ones (a random 64-bit collision is all but impossible)
    found = repeated_of(parts)
    assert found.dtype == np.uint64
    np.testing.assert_array_equal(found, expected)  # sorted, each once, nothing missed, nothing extra

    monkeypatch.setattr(keys, "MAX_BUCKETS", 5)  # capped: bigger buckets, same answer
    np.testing.assert_array_equal(repeated_of(parts), expected)


def test_one_bucket_and_no_hashes():
    parts = hashes_with_planted_duplicates(1)
    np.testing.assert_array_equal(repeated_of(parts), reference(parts))
    assert len(repeated_of([])) == 0


def test_a_partition_that_splits_equal_values_is_caught(monkeypatch):
    """The check above cannot pass with a broken partition: buckets by position instead of value
    separate most duplicates, and the answer then differs from the reference."""
    monkeypatch.setattr(keys, "HASHES_PER_BUCKET", 64)
    monkeypatch.setattr(keys, "HASHES_PER_READ", 97)
    parts = hashes_with_planted_duplicates()
    monkeypatch.setattr(keys, "bucket_of", lambda h, buckets: np.arange(len(h), dtype=np.uint64) % np.uint64(buckets))
    assert not np.array_equal(repeated_of(parts), reference(parts))
