"""Duplicate sample keys in bounded memory, through their 64-bit hashes (writer and verifier).

Equal keys have equal `latents.format.key_hash` values, so the duplicates are among the keys
whose hash occurs more than once. `HashLog` appends each shard's hashes to a local temporary
file (8 bytes a sample, nothing held); `repeated` finds the hash values seen twice, one slice of
values at a time (the values of one residue class per pass), so memory stays bounded whatever
the sample count; only the few keys behind those hashes are then compared as strings.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable

import numpy as np
import pyarrow as pa

HASHES_PER_PASS = 4 << 20  # hash values sorted at a time (32 MiB)


class HashLog:
    """Key hashes appended shard by shard to a local temporary file: ``with HashLog() as log``."""

    def __enter__(self) -> HashLog:
        self._dir = tempfile.TemporaryDirectory(prefix="sit-key-hashes-")
        self.path = os.path.join(self._dir.name, "hashes")
        self._file = open(self.path, "wb")  # closed by __exit__
        return self

    def add(self, hashes: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(hashes, dtype="<u8").tobytes())

    def repeated(self) -> np.ndarray:
        """Sorted hash values that were added more than once."""
        self._file.flush()
        total = os.path.getsize(self.path) // 8
        passes = max(1, -(-total // HASHES_PER_PASS))
        found = []
        for p in range(passes):
            part = []
            for start in range(0, total, HASHES_PER_PASS):
                chunk = np.fromfile(self.path, dtype="<u8", count=HASHES_PER_PASS, offset=start * 8)
                part.append(chunk[chunk % np.uint64(passes) == p] if passes > 1 else chunk)
            values = np.sort(np.concatenate(part)) if part else np.empty(0, np.uint64)
            found.append(np.unique(values[1:][values[1:] == values[:-1]]))
        return np.sort(np.concatenate(found)).astype(np.uint64)

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
