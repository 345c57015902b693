"""`sit verify`: check a latent dataset completely, and list everything that is wrong.

Checks: the card, manifest and sample table agree; keys are unique and their hashes right;
every manifest shard exists, has its recorded size and sha256; its tar members are exactly the
table's samples in order, at the recorded offsets; every frame of every sample decodes (zstd
checksum) to the right dtype and shape with finite values and non-negative stds; labels match;
no shard files are unlisted; the optional rejects.parquet (written by the encode job) is
readable with its schema.

Warnings, not problems: leftover temporary files (``<name>.tmp-<random>``) that a killed writer
left; they never carry a final name, so the dataset is intact. ``strict`` makes them problems.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import zstandard
from fsspec.registry import known_implementations

from latents.dataset import LatentIndex, read_rejects
from latents.format import (
    LABEL_SUFFIX,
    LATENTS_SUFFIX,
    SHARD_DIR,
    STORED_POSTERIOR,
    DatasetError,
    decode_frame,
    flip_frame,
    key_hashes,
    read_tar,
)
from latents.keys import HashLog, duplicate_keys
from latents.storage import TEMP_MARK


@dataclass
class VerifyReport:
    url: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # leftover temporaries: harmless, removable
    shards_checked: int = 0
    samples_checked: int = 0
    bytes_checked: int = 0  # shard bytes read and hashed
    seconds: float = 0.0  # wall time of the whole check
    rejected: int | None = None  # rows of rejects.parquet, if the encode job wrote one

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def mb_per_s(self) -> float:
        """Shard bytes checked per second (MB = 10^6 bytes)."""
        return self.bytes_checked / 1e6 / max(self.seconds, 1e-9)


PROCESSES_FROM_SHARDS = 64  # fewer shards: threads (a process start, ~1-2 s each, would dominate)


def verify(
    url: str,
    workers: int = 4,
    progress: bool = False,
    storage_options: dict | None = None,
    strict: bool = False,
    processes: bool | None = None,
) -> VerifyReport:
    """Check the dataset at ``url`` and report every problem found in its shards and samples.

    ``workers`` processes check shards in parallel (see `_pool`; 1: in this process; threads for
    datasets of fewer than PROCESSES_FROM_SHARDS shards unless ``processes``). Memory is
    bounded whatever the sample count: a worker holds one shard and its sample rows; this
    process, the manifest and a file of key hashes (see `latents.keys`).

    Raises `DatasetError` (one message) if the dataset cannot be opened at all: no card, a bad
    card, an unreadable or inconsistent index. ``strict``: leftover temporary files are
    problems, not warnings."""
    started = time.perf_counter()
    report = VerifyReport(url)
    index = LatentIndex.open(url, storage_options)
    try:
        rejects = read_rejects(index.root)
        report.rejected = None if rejects is None else rejects.num_rows
    except DatasetError as err:
        report.problems.append(str(err))

    names = index.shards.column("name").to_pylist()
    present = set(index.root.list(SHARD_DIR))
    for name in sorted(present - set(names)):
        if TEMP_MARK in name:
            message = f"{index.root.url_of(name)}: leftover temporary file of a killed writer (safe to delete)"
            (report.problems if strict else report.warnings).append(message)
        else:
            report.problems.append(f"{index.root.url_of(name)}: shard file not in the manifest")

    wrong_hash, wrong_count = [], 0
    with HashLog() as hashes, _pool(min(workers, len(names)), index, processes) as pool:
        tasks = [(i, names[i] in present) for i in range(len(names))]
        for i, result in enumerate(pool.map(_check_shard_task, tasks)):
            report.problems.extend(result.problems)
            wrong_hash.extend(result.wrong_hash[: 20 - len(wrong_hash)])
            wrong_count += result.wrong_count
            hashes.add(result.key_hashes)
            report.shards_checked += 1
            report.samples_checked += len(result.key_hashes)
            report.bytes_checked += result.bytes_read
            if progress:
                print(f"\rverified {i + 1}/{len(names)} shards", end="", file=sys.stderr, flush=True)
        repeated = hashes.repeated()
    if progress:
        print(file=sys.stderr)
    samples = f"{url}/samples.parquet"
    if wrong_count:
        report.problems.insert(0, f"wrong key_hash for keys {wrong_hash[:20]} ({wrong_count} in all)")
    dupes = duplicate_keys((t for _, t in index.iter_samples(["key", "key_hash"])), repeated)
    if dupes:
        report.problems.insert(0, f"duplicate keys in {samples}: {dupes[:20]} ({len(dupes)} in all)")
    report.seconds = time.perf_counter() - started
    return report


@dataclass
class _ShardResult:
    problems: list[str]
    key_hashes: np.ndarray  # the table's hashes of the shard's keys
    wrong_hash: list[str]  # keys whose recorded hash is not their key_hash (first 20)
    wrong_count: int
    bytes_read: int


_INDEX: LatentIndex | None = None  # the index a worker checks shards of (see _pool)


@contextmanager
def _pool(workers: int, index: LatentIndex, processes: bool | None):
    """An executor whose ``map`` runs `_check_shard_task`: ``workers`` processes, or this one.

    Processes are started with "spawn" (forking a process that runs arrow's or fsspec's threads
    can deadlock the child). A filesystem a new process cannot build (memory://, one registered
    at run time) is checked by threads instead: zstd and sha256 release the GIL."""
    global _INDEX
    _INDEX = index
    protocol = index.root.fs.protocol
    protocol = protocol if isinstance(protocol, str) else protocol[0]
    portable = protocol in known_implementations and protocol != "memory"
    if processes is None:
        processes = index.card.num_shards >= PROCESSES_FROM_SHARDS
    try:
        if workers <= 1:
            yield _Serial()
        elif not (portable and processes):
            with ThreadPoolExecutor(workers) as pool:
                yield pool
        else:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_set_index, initargs=(index,)) as pool:
                yield pool
    finally:
        _INDEX = None


def _set_index(index: LatentIndex) -> None:
    global _INDEX
    _INDEX = index


class _Serial:
    @staticmethod
    def map(fn, items):
        return map(fn, items)


def _check_shard_task(task: tuple[int, bool]) -> _ShardResult:
    i, exists = task
    return _check_shard(_INDEX, i, exists)


def _check_shard(index: LatentIndex, i: int, exists: bool) -> _ShardResult:
    root, spec = index.root, index.card.spec
    row = index.shards.slice(i, 1).to_pylist()[0]
    url = root.url_of(row["name"])
    rows = index.read_samples([i])
    keys = rows.column("key").combine_chunks()
    recorded = rows.column("key_hash").to_numpy()
    wrong = np.flatnonzero(key_hashes(keys) != recorded)
    result = _ShardResult([], recorded, [keys[int(j)].as_py() for j in wrong[:20]], len(wrong), 0)
    if not exists:
        result.problems.append(f"{url}: missing ({row['num_samples']} samples)")
        return result
    try:
        data = root.read_bytes(row["name"])
    except OSError as err:
        result.problems.append(f"{url}: unreadable: {err}")
        return result
    result.bytes_read = len(data)
    result.problems.extend(_check_bytes(data, row, rows.to_pydict(), url, spec))
    return result


def _check_bytes(data: bytes, row: dict, table: dict, url: str, spec) -> list[str]:
    problems = []
    if len(data) != row["bytes"]:
        problems.append(f"{url}: size {len(data)} bytes, manifest says {row['bytes']} (truncated or replaced)")
    digest = hashlib.sha256(data).hexdigest()
    if digest != row["sha256"]:
        problems.append(f"{url}: sha256 {digest[:16]}... does not match the manifest's {row['sha256'][:16]}...")

    try:
        members = {m.name: m for m in read_tar(data)}
    except ValueError as err:
        problems.append(f"{url}: {err}")
        members = {}
    expected = {k + s for k in table["key"] for s in (LATENTS_SUFFIX, LABEL_SUFFIX)}
    extra = sorted(set(members) - expected)
    if extra and members:
        problems.append(f"{url}: members not in the sample table: {extra[:10]} ({len(extra)} in all)")
    decompressor = zstandard.ZstdDecompressor()
    for key, label, offset, size, flip_offset in zip(
        table["key"], table["label"], table["offset"], table["size"], table["flip_offset"], strict=True
    ):
        where = f"{url}: sample {key}"
        latents, cls = members.get(key + LATENTS_SUFFIX), members.get(key + LABEL_SUFFIX)
        if latents is None or cls is None:
            if members:
                problems.append(f"{where}: missing from the shard")
            continue
        if (latents.offset, latents.size) != (offset, size):
            problems.append(f"{where}: at [{latents.offset}, +{latents.size}), table says [{offset}, +{size})")
            continue
        member = data[offset : offset + size]
        try:
            for f in range(spec.num_flips):
                arr = decode_frame(flip_frame(member, f, flip_offset), spec, decompressor)
                if not np.isfinite(arr).all():
                    raise ValueError(f"flip {f} has NaN or inf values")
                if spec.stored == STORED_POSTERIOR and (arr[1] < 0).any():
                    raise ValueError(f"flip {f} has a negative posterior std")
        except (ValueError, zstandard.ZstdError) as err:
            problems.append(f"{where}: does not decode: {err}")
        stored_label = data[cls.offset : cls.offset + cls.size].decode(errors="replace")
        if stored_label != str(label):
            problems.append(f"{where}: label {stored_label!r} in the shard, {label} in the table")
    return problems
