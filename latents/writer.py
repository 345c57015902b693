"""Writing latent datasets: deterministic shards, atomic publication, manifest and card last.

Two ways in:

* `DatasetWriter`, a context manager for sequential writing: ``add()`` samples; shards are cut
  every ``samples_per_shard`` samples; leaving the block without an error writes
  samples.parquet, manifest.parquet and finally card.json.
* `write_shard` + `finalize` for parallel encoders: each task writes whole shards by index and
  returns their `ShardInfo`; one process finalizes. `shard_committed` / `read_shard_info` let a
  rerun skip (and account for) shards that are already committed.

Shard sidecars (``write_shard(..., sidecar=True)``, used by `sit encode`): before publishing the
tar, the writer publishes ``shard-info/<index>.json``, the shard's whole `ShardInfo` (keys, labels,
offsets, sizes, flip offsets, float64 statistics, size, sha256, the plan it was written for and
the shard's rejects). A shard is committed when its tar exists; its sidecar then exists too, so a
rerun adopts it and the finalizer streams `iter_shard_infos` without reading any shard back.
A shard whose every input was rejected has a sidecar and no tar (`write_empty_shard_info`).

The same samples in the same order give byte-identical shards (fixed tar headers, fixed zstd
level, no timestamps).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from latents.autoencoder import LatentTransform
from latents.format import (
    CARD_NAME,
    DEFAULT_SHARD_BYTES,
    INDEX_NAMES,
    LABEL_SUFFIX,
    LATENTS_SUFFIX,
    MANIFEST_NAME,
    REJECTS_NAME,
    SAMPLE_SCHEMA,
    SAMPLES_NAME,
    SHARD_DIR,
    SHARD_SCHEMA,
    TAR_BLOCK,
    TAR_RECORD,
    ZSTD_LEVEL,
    DatasetCard,
    DatasetError,
    LatentSpec,
    ShardError,
    check_key,
    check_sample,
    decode_frame,
    encode_sample,
    flip_frame,
    key_hashes,
    label_bytes,
    read_tar,
    shard_name,
    tar_header,
)
from latents.keys import HashLog, duplicate_keys
from latents.storage import TEMP_MARK, Root


def tool_version() -> str:
    try:
        return f"sit-pipeline {version('sit-pipeline')}"
    except PackageNotFoundError:
        return "sit-pipeline (not installed)"


@dataclass
class ShardInfo:
    """A committed shard: its manifest row, its samples' rows and latent statistics."""

    index: int
    num_bytes: int
    sha256: str
    keys: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    flip_offsets: list[int] = field(default_factory=list)
    # per-channel sums over every stored flip: latent mean, its square, posterior variance
    sum_mean: np.ndarray | None = None
    sum_sq: np.ndarray | None = None
    sum_var: np.ndarray | None = None
    count: int = 0  # values per channel summed
    rejects: list[tuple[str, str, str, str]] = field(default_factory=list)  # (key, source, reason, error)
    plan: str = ""  # what the shard was planned from (the encode job's span digest)

    @property
    def name(self) -> str:
        return shard_name(self.index)

    def to_json(self) -> str:
        out = {k: getattr(self, k) for k in _SIDECAR_FIELDS}
        for k in ("sum_mean", "sum_sq", "sum_var"):
            out[k] = [float(v) for v in out[k]]  # repr of a float64 round-trips exactly
        out["rejects"] = [list(r) for r in self.rejects]
        return json.dumps(out, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> ShardInfo:
        d = json.loads(text)
        info = cls(**{k: d[k] for k in _SIDECAR_FIELDS})
        info.sum_mean, info.sum_sq, info.sum_var = (
            np.asarray(d[k], np.float64) for k in ("sum_mean", "sum_sq", "sum_var")
        )
        info.rejects = [tuple(r) for r in d["rejects"]]
        return info

    @property
    def num_samples(self) -> int:
        return len(self.keys)


_SIDECAR_FIELDS = (
    "index", "num_bytes", "sha256", "keys", "labels", "offsets", "sizes", "flip_offsets",
    "sum_mean", "sum_sq", "sum_var", "count", "rejects", "plan",
)  # fmt: skip
SIDECAR_DIR = "shard-info"  # owned here: the encode job's per-shard sidecars (not part of a finished dataset's index)


def sidecar_name(index: int) -> str:
    return f"{SIDECAR_DIR}/{index:06d}.json"


class _ShardBuilder:
    """Accumulates one shard's tar bytes in memory, with its index rows and statistics."""

    def __init__(self, index: int, spec: LatentSpec):
        self.spec = spec
        self.buf = io.BytesIO()
        self.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True, write_content_size=True)
        c = spec.latent_shape[0]
        self.info = ShardInfo(index, 0, "", sum_mean=np.zeros(c), sum_sq=np.zeros(c), sum_var=np.zeros(c))

    def _member(self, name: str, data: bytes) -> int:
        self.buf.write(tar_header(name, len(data)))
        offset = self.buf.tell()
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % TAR_BLOCK))
        return offset

    def add(self, key: str, label: int, array: np.ndarray) -> None:
        check_key(key)
        member, flip_offset = encode_sample(key, array, self.spec, self.compressor)
        info = self.info
        info.offsets.append(self._member(key + LATENTS_SUFFIX, member))
        self._member(key + LABEL_SUFFIX, label_bytes(label))
        info.keys.append(key)
        info.labels.append(int(label))
        info.sizes.append(len(member))
        info.flip_offsets.append(flip_offset)
        _accumulate(info, np.asarray(array, dtype=self.spec.storage_dtype), self.spec)

    def finish(self) -> bytes:
        self.buf.write(b"\0" * (2 * TAR_BLOCK))
        self.buf.write(b"\0" * (-self.buf.tell() % TAR_RECORD))
        data = self.buf.getvalue()
        self.info.num_bytes = len(data)
        self.info.sha256 = hashlib.sha256(data).hexdigest()
        return data


def _accumulate(info: ShardInfo, array: np.ndarray, spec: LatentSpec) -> None:
    # array: (F, K, C, H, W) in storage dtype; statistics in float64
    x = array.astype(np.float64)
    mean = x[:, 0]  # (F, C, H, W)
    info.sum_mean += mean.sum(axis=(0, 2, 3))
    info.sum_sq += (mean**2).sum(axis=(0, 2, 3))
    if spec.frame_shape[0] == 2:
        info.sum_var += (x[:, 1] ** 2).sum(axis=(0, 2, 3))
    info.count += mean.shape[0] * mean.shape[2] * mean.shape[3]


def write_shard(
    root: Root | str,
    index: int,
    samples: Iterable[tuple[str, int, np.ndarray]],
    spec: LatentSpec,
    *,
    sidecar: bool = False,
    rejects: Iterable[tuple[str, str, str, str]] = (),
    plan: str = "",
) -> ShardInfo:
    """Write shard ``index`` from (key, label, (F, K, C, H, W) array) triples; atomically.

    Sweeps the leftover temporaries of this shard (from a writer of it that was killed) first.
    With ``sidecar``, publishes the shard's `ShardInfo` (with ``rejects`` and ``plan``) under
    `sidecar_name` before the tar, so a committed shard always has its sidecar.
    Raises ValueError naming the key for a sample the format cannot hold (NaN/inf, negative std).
    """
    root = Root(root) if isinstance(root, str) else root
    builder = _ShardBuilder(index, spec)
    for key, label, array in samples:
        builder.add(key, label, array)
    if not builder.info.keys:
        raise ValueError(f"shard {index} has no samples")
    data = builder.finish()
    builder.info.rejects, builder.info.plan = [tuple(r) for r in rejects], plan
    names = [shard_name(index), *([sidecar_name(index)] if sidecar else [])]
    root.sweep_temporaries(names)
    if sidecar:
        root.publish_bytes(sidecar_name(index), builder.info.to_json().encode())
    root.publish_bytes(shard_name(index), data)
    return builder.info


def write_empty_shard_info(
    root: Root | str, index: int, spec: LatentSpec, rejects: Iterable[tuple[str, str, str, str]], plan: str = ""
) -> ShardInfo:
    """Record a shard whose every input was rejected: a sidecar with no samples, and no tar."""
    root = Root(root) if isinstance(root, str) else root
    c = spec.latent_shape[0]
    info = ShardInfo(index, 0, "", sum_mean=np.zeros(c), sum_sq=np.zeros(c), sum_var=np.zeros(c))
    info.rejects, info.plan = [tuple(r) for r in rejects], plan
    root.sweep_temporaries([sidecar_name(index)])
    root.publish_bytes(sidecar_name(index), info.to_json().encode())
    return info


def read_sidecar(root: Root | str, index: int) -> ShardInfo:
    """Shard ``index``'s sidecar (see the module docstring); ShardError names a damaged one."""
    root = Root(root) if isinstance(root, str) else root
    name = sidecar_name(index)
    try:
        info = ShardInfo.from_json(root.read_bytes(name))
    except (ValueError, KeyError, TypeError) as err:
        raise ShardError(f"{root.url_of(name)}: not a shard sidecar ({type(err).__name__}: {err})") from None
    if info.index != index:
        raise ShardError(f"{root.url_of(name)}: holds shard {info.index}, not {index}")
    return info


def iter_shard_infos(
    root: Root | str, num_shards: int, spec: LatentSpec | None = None, prefetch: int = 8
) -> Iterator[ShardInfo]:
    """The sidecars of shards 0..num_shards-1, in index order, read by threads at most ``prefetch`` ahead.

    Memory holds ``prefetch`` shard infos at a time, whatever the number of shards (``spec`` is
    accepted for symmetry with `read_shard_info`; sidecars carry everything)."""
    root = Root(root) if isinstance(root, str) else root
    root.fs.invalidate_cache()  # sidecars come from other processes: no listing cached before they were written
    with ThreadPoolExecutor(min(prefetch, max(1, num_shards))) as pool:
        window: deque = deque()
        for i in range(num_shards):
            window.append(pool.submit(read_sidecar, root, i))
            if len(window) >= prefetch:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def shard_committed(root: Root | str, index: int) -> bool:
    root = Root(root) if isinstance(root, str) else root
    return root.exists(shard_name(index))


def read_shard_info(root: Root | str, index: int, spec: LatentSpec) -> ShardInfo:
    """Rebuild a committed shard's `ShardInfo` from its bytes (to adopt it on a rerun)."""
    root = Root(root) if isinstance(root, str) else root
    name = shard_name(index)
    data = root.read_bytes(name)
    c = spec.latent_shape[0]
    info = ShardInfo(index, len(data), hashlib.sha256(data).hexdigest())
    info.sum_mean, info.sum_sq, info.sum_var = np.zeros(c), np.zeros(c), np.zeros(c)
    decompressor = zstandard.ZstdDecompressor()
    try:
        members = read_tar(data)
    except ValueError as err:
        raise ShardError(f"{root.url_of(name)}: {err}") from None
    if len(members) % 2:
        raise ShardError(f"{root.url_of(name)}: odd number of members ({len(members)}); last {members[-1].name!r}")
    for latents, label in zip(members[::2], members[1::2], strict=True):
        key = latents.name.removesuffix(LATENTS_SUFFIX)
        if not latents.name.endswith(LATENTS_SUFFIX) or label.name != key + LABEL_SUFFIX:
            raise ShardError(f"{root.url_of(name)}: unexpected members {latents.name!r}, {label.name!r}")
        member = data[latents.offset : latents.offset + latents.size]
        flip_offset = _first_frame_size(member) if spec.flips else 0
        frames = [flip_frame(member, f, flip_offset) for f in range(spec.num_flips)]
        try:
            array = np.stack([decode_frame(fr, spec, decompressor) for fr in frames])
        except (ValueError, zstandard.ZstdError) as err:
            raise ShardError(f"{root.url_of(name)}: sample {key}: {err}") from None
        info.keys.append(key)
        info.labels.append(int(data[label.offset : label.offset + label.size]))
        info.offsets.append(latents.offset)
        info.sizes.append(latents.size)
        info.flip_offsets.append(flip_offset)
        _accumulate(info, array, spec)
    return info


def _first_frame_size(member: bytes) -> int:
    obj = zstandard.ZstdDecompressor().decompressobj()
    obj.decompress(member)
    return len(member) - len(obj.unused_data)


def finalize(
    root: Root | str,
    shards: Iterable[ShardInfo],
    *,
    spec: LatentSpec,
    resolution: int,
    vae: str,
    num_classes: int,
    autoencoder: dict | None = None,
    transform: LatentTransform | None = None,
    scaling_factor: float | None = None,
    source_fingerprint: str = "",
    extra: dict | None = None,
) -> DatasetCard:
    """Write samples.parquet, manifest.parquet and, last, card.json for committed shards.

    ``shards``: the committed shards' `ShardInfo`, consumed once, streaming (a generator
    yielding them in index order 0..n-1; a list may be in any order). Memory stays bounded
    whatever the sample count: each shard becomes one row group of samples.parquet, written to
    a local temporary file as it arrives; keys are checked for duplicates through their 64-bit
    hashes (`latents.keys`).

    The finalizer owns the whole dataset: it first sweeps every leftover temporary (of shards
    and index files) that killed writers left, so the finished dataset verifies clean.
    ``autoencoder`` is `latents.autoencoder.Autoencoder.identity` (its class and config hash are
    kept) and ``transform`` its own transform; ``scaling_factor`` alone is short for an SD-like
    ``LatentTransform(scale=scaling_factor)`` (test datasets).
    """
    if transform is None:
        transform = LatentTransform(scale=1.0 if scaling_factor is None else scaling_factor)
    identity = {k: str((autoencoder or {}).get(k, "")) for k in ("class", "config_sha256")}
    root = Root(root) if isinstance(root, str) else root
    if isinstance(shards, (list, tuple)):
        shards = sorted(shards, key=lambda s: s.index)
    c = spec.latent_shape[0]
    sums, count = np.zeros((3, c)), 0  # latent mean, its square, posterior variance
    num_samples = 0
    manifest: dict[str, list] = {f.name: [] for f in SHARD_SCHEMA}
    with tempfile.TemporaryDirectory(prefix="sit-finalize-") as tmp:
        samples_path = os.path.join(tmp, SAMPLES_NAME)
        with pq.ParquetWriter(samples_path, SAMPLE_SCHEMA, **SAMPLES_PARQUET) as table, HashLog() as hashes:
            for info in shards:
                expected = len(manifest["shard"])
                if info.index != expected:
                    raise DatasetError(
                        f"{root.url}: shard indices must be 0..n-1 once each, in order: "
                        f"got shard {info.index} where shard {expected} was due"
                    )
                rows = _sample_rows(info, num_classes, root)
                table.write_table(rows, row_group_size=max(1, rows.num_rows))
                hashes.add(rows.column("key_hash").to_numpy())
                for name, value in (
                    ("shard", info.index),
                    ("name", info.name),
                    ("num_samples", info.num_samples),
                    ("bytes", info.num_bytes),
                    ("sha256", info.sha256),
                    ("first_sample", num_samples),
                ):
                    manifest[name].append(value)
                num_samples += info.num_samples
                sums += np.stack([info.sum_mean, info.sum_sq, info.sum_var])
                count += info.count
            repeated = hashes.repeated()
        if not manifest["shard"]:
            raise DatasetError(f"{root.url}: shard indices must be 0..n-1 once each, got none")
        pf = pq.ParquetFile(samples_path)
        groups = (pf.read_row_group(g, ["key", "key_hash"], use_threads=False) for g in range(pf.num_row_groups))
        dupes = duplicate_keys(groups, repeated)
        if dupes:
            raise DatasetError(f"{root.url}: duplicate sample keys: {dupes[:10]} ({len(dupes)} in all)")
        mean = sums[0] / count
        var = sums[1] / count - mean**2 + sums[2] / count
        card = DatasetCard(
            resolution=int(resolution),
            latent_shape=list(spec.latent_shape),
            stored=spec.stored,
            flips=spec.flips,
            vae=vae,
            autoencoder=identity,
            transform=transform.to_dict(),
            num_classes=int(num_classes),
            num_samples=num_samples,
            num_shards=len(manifest["shard"]),
            total_bytes=int(sum(manifest["bytes"])),
            channel_mean=[float(v) for v in mean],
            channel_std=[float(v) for v in np.sqrt(np.maximum(var, 0))],
            source_fingerprint=source_fingerprint,
            tool_version=tool_version(),
            extra=extra or {},
        )
        stale_shards = {n[: n.index(TEMP_MARK)] for n in root.list(SHARD_DIR) if TEMP_MARK in n}
        root.sweep_temporaries([*sorted(stale_shards), *INDEX_NAMES, REJECTS_NAME])
        root.publish_file(SAMPLES_NAME, samples_path)
    root.publish_bytes(MANIFEST_NAME, _parquet_bytes(pa.table(manifest, schema=SHARD_SCHEMA)))
    root.publish_bytes(CARD_NAME, card.to_json().encode())
    return card


# samples.parquet: one row group per shard (readers fetch only the shards they need); no
# column statistics (they would make the footer, which every reader fetches, grow with keys)
SAMPLES_PARQUET = {"compression": "zstd", "write_statistics": False}


def _sample_rows(info: ShardInfo, num_classes: int, root: Root) -> pa.Table:
    """One shard's samples.parquet rows, with its labels checked and its keys hashed."""
    labels = np.asarray(info.labels, dtype=np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        pairs = [(info.keys[i], int(labels[i])) for i in bad[:10]]
        raise DatasetError(f"{root.url}: labels outside [0, {num_classes}) in shard {info.index}: {pairs}")
    keys = pa.array(info.keys, pa.string())
    return pa.table(
        {
            "key": keys,
            "label": pa.array(labels, pa.int32()),
            "shard": pa.array(np.full(len(labels), info.index, dtype=np.int32)),
            "offset": pa.array(info.offsets, pa.int64()),
            "size": pa.array(info.sizes, pa.int32()),
            "flip_offset": pa.array(info.flip_offsets, pa.int32()),
            "key_hash": pa.array(key_hashes(keys), pa.uint64()),
        },
        schema=SAMPLE_SCHEMA,
    )


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()  # arrow-owned memory: no Python file object in arrow's threads
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


class DatasetWriter:
    """Sequential writer: ``with DatasetWriter(url, spec, ...) as w: w.add(key, label, array)``.

    Shards hold ``samples_per_shard`` samples (default: from ``shard_bytes``, see
    `LatentSpec.samples_per_shard`). A shard already committed under its name is adopted, not
    rewritten, if it holds the same keys; so a rerun after a crash rewrites only what is missing.
    The card is written on a clean exit only: an exception leaves the dataset incomplete.
    Memory stays bounded: each flushed shard's `ShardInfo` goes to a local temporary file, and
    `finalize` streams them back.
    """

    def __init__(
        self,
        url: str,
        spec: LatentSpec,
        *,
        resolution: int,
        vae: str,
        num_classes: int,
        scaling_factor: float | None = None,
        autoencoder: dict | None = None,
        transform: LatentTransform | None = None,
        source_fingerprint: str = "",
        samples_per_shard: int | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        extra: dict | None = None,
        storage_options: dict | None = None,
    ):
        self.root = Root(url, storage_options)
        self.spec = spec
        self.samples_per_shard = samples_per_shard or spec.samples_per_shard(shard_bytes)
        self.card_fields = {
            "resolution": resolution,
            "vae": vae,
            "scaling_factor": scaling_factor,
            "autoencoder": autoencoder,
            "transform": transform,
            "num_classes": num_classes,
            "source_fingerprint": source_fingerprint,
            "extra": extra,
        }
        self.num_shards = 0  # shards flushed so far
        self._spill = None  # their ShardInfo, pickled to a local temporary file (opened by __enter__)
        self.adopted: list[int] = []  # shards found committed and kept
        self._pending: list[tuple[str, int, np.ndarray]] = []
        self.card: DatasetCard | None = None

    def __enter__(self) -> DatasetWriter:
        if self.root.exists(CARD_NAME):
            raise DatasetError(f"{self.root.url}: a complete dataset is already there (card.json exists)")
        self._spill = tempfile.TemporaryFile(prefix="sit-shard-infos-")  # closed by __exit__
        return self

    def add(self, key: str, label: int, array: np.ndarray) -> None:
        """Add one sample: ``array`` of shape (F, K, C, H, W) (see `LatentSpec.sample_shape`)."""
        check_sample(check_key(key), array, self.spec)
        self._pending.append((key, int(label), array))
        if len(self._pending) == self.samples_per_shard:
            self._flush()

    def _flush(self) -> None:
        index = self.num_shards
        if shard_committed(self.root, index):
            info = read_shard_info(self.root, index, self.spec)
            expected = [k for k, _, _ in self._pending]
            if info.keys != expected:
                raise DatasetError(
                    f"{self.root.url_of(info.name)} is committed with other samples than this run's "
                    f"(first keys {info.keys[:3]} vs {expected[:3]}): write to a new URL or remove it"
                )
            self.adopted.append(index)
        else:
            info = write_shard(self.root, index, self._pending, self.spec)
        pickle.dump(info, self._spill, protocol=pickle.HIGHEST_PROTOCOL)
        self.num_shards += 1
        self._pending = []

    def _shard_infos(self) -> Iterator[ShardInfo]:
        """The flushed shards' `ShardInfo`, in index order, read back one at a time."""
        self._spill.seek(0)
        for _ in range(self.num_shards):
            yield pickle.load(self._spill)

    def __exit__(self, exc_type, exc, tb) -> bool:
        with self._spill:
            if exc_type is not None:
                return False
            if self._pending:
                self._flush()
            if not self.num_shards:
                raise DatasetError(f"{self.root.url}: no samples were added")
            self.card = finalize(self.root, self._shard_infos(), spec=self.spec, **self.card_fields)
        return False
