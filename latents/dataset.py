"""Opening a latent dataset: card, manifest and sample table, checked against each other."""

from __future__ import annotations

from dataclasses import dataclass

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
from latents.storage import Root


@dataclass
class LatentIndex:
    """Everything about a complete dataset except the shard bytes."""

    root: Root
    card: DatasetCard
    shards: pa.Table  # manifest.parquet (SHARD_SCHEMA)
    samples: pa.Table  # samples.parquet (SAMPLE_SCHEMA)

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
        samples = _read_table(root, SAMPLES_NAME, SAMPLE_SCHEMA)
        index = cls(root, card, shards, samples)
        index._check()
        return index

    def _check(self) -> None:
        card, url = self.card, self.root.url
        problems = []
        if self.shards.num_rows != card.num_shards:
            problems.append(f"manifest lists {self.shards.num_rows} shards, card says {card.num_shards}")
        if self.samples.num_rows != card.num_samples:
            problems.append(f"sample table has {self.samples.num_rows} rows, card says {card.num_samples}")
        counts = self.shard_column("num_samples")
        if counts.sum() != self.samples.num_rows:
            problems.append(f"manifest sample counts add up to {counts.sum()}, not {self.samples.num_rows}")
        first = self.shard_column("first_sample")
        if len(first) and not np.array_equal(first, np.concatenate([[0], np.cumsum(counts)[:-1]])):
            problems.append("manifest first_sample column is not the running sum of num_samples")
        if problems:
            raise DatasetError(f"{url}: inconsistent dataset index: " + "; ".join(problems))

    def shard_column(self, name: str) -> np.ndarray:
        """A manifest column (one value per shard) as numpy."""
        return self.shards.column(name).to_numpy()

    def sample_column(self, name: str) -> np.ndarray:
        """A sample-table column (one value per sample) as numpy."""
        return self.samples.column(name).to_numpy()

    @property
    def mean_sample_bytes(self) -> float:
        return self.card.total_bytes / max(1, self.card.num_samples)


def _read_table(root: Root, name: str, schema: pa.Schema) -> pa.Table:
    if not root.exists(name):
        raise IncompleteDatasetError(f"{root.url_of(name)} is missing although {CARD_NAME} exists")
    data = root.read_bytes(name)
    try:
        table = pq.read_table(_arrow_owned(data), use_threads=False)
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

    ``pq.read_table(io.BytesIO(...))`` lets arrow's I/O threads hold buffers that point into a
    Python object; one released during interpreter shutdown aborts the process (SIGABRT after
    the command's output). An arrow-owned copy involves no Python object at all.
    """
    sink = pa.BufferOutputStream()
    sink.write(data)
    return pa.BufferReader(sink.getvalue())
