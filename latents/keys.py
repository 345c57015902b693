"""Duplicate sample keys in bounded memory, through their 64-bit hashes (writer and verifier).

Equal keys have equal `latents.format.key_hash` values, so the duplicates are among the keys
whose hash occurs more than once. `HashLog` appends each shard's hashes to a local temporary
file (8 bytes a sample, nothing held); `repeated` finds the hash values seen twice by an external
hash partition: one streaming pass scatters the hashes, a fixed-size chunk at a time, into
bucket files by their top bits (bucket b holds the values in [b, b + 1) x 2^64 / buckets, so
equal values always meet in one bucket), then each bucket is sorted alone. Memory is a few
chunks and one bucket whatever the sample count (key hashes are uniform, so buckets are even);
I/O is twice the hash file. Only the few keys behind the repeated hashes are then compared as
strings (`duplicate_keys`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable

import numpy as np
import pyarrow as pa

HASHES_PER_BUCKET = 1 << 20  # hash values sorted at a time (8 MiB)
HASHES_PER_READ = 1 << 19  # hash values scattered at a time (4 MiB)
MAX_BUCKETS = 256  # open bucket files; beyond 256M samples the buckets grow instead (2 GiB of hashes)


def bucket_of(hashes: np.ndarray, buckets: int) -> np.ndarray:
    """Bucket of each hash value: its top 32 bits scaled to [0, buckets), monotone in the value."""
    return ((hashes >> np.uint64(32)) * np.uint64(buckets)) >> np.uint64(32)


def _repeated_sorted(values: np.ndarray) -> np.ndarray:
    """Values occurring more than once in sorted ``values``, once each."""
    return np.unique(values[1:][values[1:] == values[:-1]])


class HashLog:
    """Key hashes appended shard by shard to a local temporary file: ``with HashLog() as log``."""

    def __enter__(self) -> HashLog:
        self._dir = tempfile.TemporaryDirectory(prefix="sit-key-hashes-")
        self.path = os.path.join(self._dir.name, "hashes")
        self._file = open(self.path, "wb")  # closed by __exit__
        return self

    def add(self, hashes: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(hashes, dtype="<u8").tobytes())

    def _chunks(self, path: str):
        with open(path, "rb") as f:
            while len(chunk := np.fromfile(f, dtype="<u8", count=HASHES_PER_READ)):
                yield chunk

    def repeated(self) -> np.ndarray:
        """Sorted hash values that were added more than once."""
        self._file.flush()
        total = os.path.getsize(self.path) // 8
        buckets = min(MAX_BUCKETS, max(1, -(-total // HASHES_PER_BUCKET)))
        if buckets == 1:
            return _repeated_sorted(np.sort(np.fromfile(self.path, dtype="<u8"))).astype(np.uint64)
        paths = [os.path.join(self._dir.name, f"bucket-{b}") for b in range(buckets)]
        with contextlib.ExitStack() as stack:
            files = [stack.enter_context(open(p, "wb")) for p in paths]
            for chunk in self._chunks(self.path):  # scatter: one pass over the log
                ids = bucket_of(chunk, buckets)
                ends = np.cumsum(np.bincount(ids.astype(np.int64), minlength=buckets))
                scattered = chunk[np.argsort(ids, kind="stable")]
                del ids
                for b, (lo, hi) in enumerate(zip(np.concatenate([[0], ends[:-1]]), ends, strict=True)):
                    if hi > lo:
                        files[b].write(scattered[lo:hi].tobytes())
        found = []
        for path in paths:  # each bucket alone; buckets are ascending ranges of values
            values = np.fromfile(path, dtype="<u8")
            os.remove(path)
            values.sort()
            found.append(_repeated_sorted(values))
        return np.concatenate(found).astype(np.uint64)

    def __exit__(self, *exc) -> None:
        self._file.close()
        self._dir.cleanup()


def duplicate_keys(tables: Iterable[pa.Table], hashes: np.ndarray) -> list[str]:
    """Keys that occur more than once among the rows (``key`` and ``key_hash`` columns of
    ``tables``, streamed) whose hash is in ``hashes``; sorted."""
    if not len(hashes):
        return []
    counts: dict[str, int] = {}
    for rows in tables:
        hit = np.isin(rows.column("key_hash").to_numpy(), hashes)
        for key in rows.column("key").filter(pa.array(hit)).to_pylist():
            counts[key] = counts.get(key, 0) + 1
    return sorted(k for k, n in counts.items() if n > 1)
