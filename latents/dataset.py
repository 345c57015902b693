"""Opening a latent dataset: card, manifest and sample-table footer, checked against each other;
per-sample rows read a few shards at a time."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from latents.artifacts import Kind, describe
from latents.format import (
    CARD_NAME,
    MANIFEST_NAME,
    REJECTS_NAME,
    REJECTS_SCHEMA,
    SAMPLE_SCHEMA,
    SAMPLES_NAME,
    SHARD_DIR,
    SHARD_SCHEMA,
    DatasetCard,
    DatasetError,
    IncompleteDatasetError,
)
from latents.storage import Root, StorageError, retry


@dataclass
class LatentIndex:
    """Everything about a complete dataset except the shard bytes - without its per-sample rows.

    Opening reads the card, the manifest (one row per shard) and the footer of samples.parquet:
    O(shards), whatever the sample count. Per-sample rows are read on demand, a few shards at a
    time (`read_samples`): samples.parquet holds one row group per shard (as written since
    issue 15; a file with other row groups, written before, is read by whole row groups).
    """

    root: Root
    card: DatasetCard
    shards: pa.Table  # manifest.parquet (SHARD_SCHEMA)
    row_group_starts: np.ndarray  # first row of each row group of samples.parquet, then its row count

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None, attempts: int = 5) -> LatentIndex:
        """Open and cross-check a dataset; ``attempts``: tries per storage request."""
        root = Root(url, storage_options, attempts)
        if not root.exists(CARD_NAME):
            present = [n for n in (MANIFEST_NAME, SAMPLES_NAME) if root.exists(n)] + root.list(SHARD_DIR)[:1]
            if present:
                raise IncompleteDatasetError(
                    f"{root.url}: dataset is incomplete: {CARD_NAME} is missing but {present[0]} exists "
                    "(still being written, or the writer stopped before finishing)"
                )
            found = describe(root.url)
            there = "" if found in (Kind.NOTHING.value, Kind.EMPTY.value, Kind.FOLDER.value) else f"; it is {found}"
            raise DatasetError(f"{root.url}: no latent dataset here ({CARD_NAME} not found{there})")
        card = DatasetCard.from_json(root.read_bytes(CARD_NAME), root.url_of(CARD_NAME))
        shards = _read_table(root, MANIFEST_NAME, SHARD_SCHEMA)
        if not root.exists(SAMPLES_NAME):
            raise IncompleteDatasetError(f"{root.url_of(SAMPLES_NAME)} is missing although {CARD_NAME} exists")
        meta = _parquet_call(root, SAMPLES_NAME, lambda f: _checked_metadata(root, f))
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        index = cls(root, card, shards, np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]))
        index._check()
        return index

    @property
    def num_sample_rows(self) -> int:
        return int(self.row_group_starts[-1])

    def _check(self) -> None:
        card, url, rows = self.card, self.root.url, self.num_sample_rows
        problems = []
        if self.shards.num_rows != card.num_shards:
            problems.append(f"manifest lists {self.shards.num_rows} shards, card says {card.num_shards}")
        if rows != card.num_samples:
            problems.append(f"sample table has {rows} rows, card says {card.num_samples}")
        counts = self.shard_column("num_samples")
        if counts.sum() != rows:
            problems.append(f"manifest sample counts add up to {counts.sum()}, not {rows}")
        first = self.shard_column("first_sample")
        if len(first) and not np.array_equal(first, np.concatenate([[0], np.cumsum(counts)[:-1]])):
            problems.append("manifest first_sample column is not the running sum of num_samples")
        if problems:
            raise DatasetError(f"{url}: inconsistent dataset index: " + "; ".join(problems))

    def shard_column(self, name: str) -> np.ndarray:
        """A manifest column (one value per shard) as numpy."""
        return self.shards.column(name).to_numpy()

    def read_samples(self, shards, columns: list[str] | None = None) -> pa.Table:
        """The samples.parquet rows of ``shards`` (ascending shard indices), concatenated in that
        order: memory in proportion to those shards' samples, not to the dataset's."""
        shards = np.asarray(shards, dtype=np.int64)
        first, count = self.shard_column("first_sample"), self.shard_column("num_samples")
        starts = self.row_group_starts

        def read(f) -> pa.Table:
            pf = pq.ParquetFile(f)
            parts, cached, cached_groups = [], None, None
            for s in shards.tolist():
                lo, hi = int(first[s]), int(first[s] + count[s])
                g0 = int(np.searchsorted(starts, lo, side="right")) - 1
                g1 = int(np.searchsorted(starts, hi, side="left"))  # row groups [g0, g1) hold [lo, hi)
                if cached_groups != (g0, g1):  # consecutive shards of an old file share a row group
                    cached = pf.read_row_groups(list(range(g0, g1)), columns=columns, use_threads=False)
                    cached_groups = (g0, g1)
                parts.append(cached.slice(lo - int(starts[g0]), hi - lo))
            return pa.concat_tables(parts) if parts else _empty(columns)

        return _parquet_call(self.root, SAMPLES_NAME, read)

    def iter_samples(self, columns: list[str] | None = None, shards_at_a_time: int = 8):
        """(first shard, table) for every few shards in order: the whole sample table, streamed."""
        n = self.card.num_shards
        for s in range(0, n, shards_at_a_time):
            yield s, self.read_samples(np.arange(s, min(n, s + shards_at_a_time)), columns)

    @cached_property
    def samples(self) -> pa.Table:
        """The whole sample table (SAMPLE_SCHEMA), for tools and tests; the reader and the
        verifier never load it (O(samples) memory)."""
        return self.read_samples(np.arange(self.card.num_shards))

    def sample_column(self, name: str) -> np.ndarray:
        """A sample-table column (one value per sample) as numpy, for the whole dataset."""
        return self.read_samples(np.arange(self.card.num_shards), [name]).column(name).to_numpy()

    @property
    def mean_sample_bytes(self) -> float:
        return self.card.total_bytes / max(1, self.card.num_samples)


def _empty(columns: list[str] | None) -> pa.Table:
    schema = SAMPLE_SCHEMA if columns is None else pa.schema([SAMPLE_SCHEMA.field(c) for c in columns])
    return schema.empty_table()


def _checked_metadata(root: Root, f) -> pq.FileMetaData:
    pf = pq.ParquetFile(f)
    schema = pf.schema_arrow
    if not schema.equals(SAMPLE_SCHEMA, check_metadata=False):
        raise DatasetError(f"{root.url_of(SAMPLES_NAME)}: schema {schema} is not the expected {SAMPLE_SCHEMA}")
    return pf.metadata


def _parquet_call(root: Root, name: str, fn):
    """``fn(file)`` on parquet file ``name``, opened for range reads (only the parts ``fn``
    reads are fetched), retried on transient storage errors; unreadable parquet is one line."""

    def attempt():
        if root.is_local:
            return fn(root.full(name))
        with root.fs.open(root.full(name), "rb", cache_type="none") as f:
            return fn(f)

    try:
        return retry(attempt, f"reading {root.url_of(name)}", root.attempts)
    except FileNotFoundError:
        raise IncompleteDatasetError(f"{root.url_of(name)} is missing although {CARD_NAME} exists") from None
    except (pa.ArrowException, OSError) as err:
        if isinstance(err, StorageError):
            raise
        raise DatasetError(f"{root.url_of(name)}: unreadable parquet ({err})") from None


def _read_table(root: Root, name: str, schema: pa.Schema) -> pa.Table:
    """A small parquet file (manifest, rejects), whole, checked against ``schema``.

    Read with `pq.ParquetFile`, not `pq.read_table`: the latter is `pyarrow.dataset`'s scanner,
    whose import and buffers cost every reader process (each rank and DataLoader worker) ~7 MiB
    that it never gives back."""
    if not root.exists(name):
        raise IncompleteDatasetError(f"{root.url_of(name)} is missing although {CARD_NAME} exists")
    data = root.read_bytes(name)
    try:
        table = pq.ParquetFile(_arrow_owned(data)).read(use_threads=False)
    except (pa.ArrowException, OSError) as err:
        raise DatasetError(f"{root.url_of(name)}: unreadable parquet ({err})") from None
    if not table.schema.equals(schema, check_metadata=False):
        raise DatasetError(f"{root.url_of(name)}: schema {table.schema} is not the expected {schema}")
    return table


def read_rejects(root: Root) -> pa.Table | None:
    """The encode job's optional rejects.parquet (REJECTS_SCHEMA), or None if there is none."""
    if not root.exists(REJECTS_NAME):
        return None
    return _read_table(root, REJECTS_NAME, REJECTS_SCHEMA)


def _arrow_owned(data: bytes) -> pa.BufferReader:
    """A reader over a copy of ``data`` in arrow-owned memory.

    Parquet read from ``io.BytesIO(...)`` lets arrow's I/O threads hold buffers that point into a
    Python object; one released during interpreter shutdown aborts the process (SIGABRT after
    the command's output). An arrow-owned copy involves no Python object at all.
    """
    sink = pa.BufferOutputStream()
    sink.write(data)
    return pa.BufferReader(sink.getvalue())
