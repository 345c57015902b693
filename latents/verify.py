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
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import zstandard

from latents.dataset import LatentIndex, read_rejects
from latents.format import (
    LABEL_SUFFIX,
    LATENTS_SUFFIX,
    SHARD_DIR,
    STORED_POSTERIOR,
    DatasetError,
    decode_frame,
    flip_frame,
    key_hash,
    read_tar,
)
from latents.storage import TEMP_MARK


@dataclass
class VerifyReport:
    url: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # leftover temporaries: harmless, removable
    shards_checked: int = 0
    samples_checked: int = 0
    rejected: int | None = None  # rows of rejects.parquet, if the encode job wrote one

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(
    url: str, workers: int = 4, progress: bool = False, storage_options: dict | None = None, strict: bool = False
) -> VerifyReport:
    """Check the dataset at ``url`` and report every problem found in its shards and samples.

    Raises `DatasetError` (one message) if the dataset cannot be opened at all: no card, a bad
    card, an unreadable or inconsistent index. ``strict``: leftover temporary files are
    problems, not warnings."""
    report = VerifyReport(url)
    index = LatentIndex.open(url, storage_options)
    keys = index.samples.column("key").to_pylist()
    counts: dict[str, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    dupes = sorted(k for k, n in counts.items() if n > 1)
    if dupes:
        report.problems.append(f"duplicate keys in {url}/samples.parquet: {dupes[:20]} ({len(dupes)} in all)")
    hashes = index.sample_column("key_hash")
    wrong = [k for k, h in zip(keys, hashes.tolist(), strict=True) if key_hash(k) != h]
    if wrong:
        report.problems.append(f"wrong key_hash for keys {wrong[:20]} ({len(wrong)} in all)")

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

    def check(i: int) -> list[str]:
        return _check_shard(index, i, names[i] in present)

    with ThreadPoolExecutor(max(1, workers)) as pool:  # zstd and sha256 release the GIL
        for i, problems in enumerate(pool.map(check, range(len(names)))):
            report.problems.extend(problems)
            report.shards_checked += 1
            report.samples_checked += int(index.shard_column("num_samples")[i])
            if progress:
                print(f"\rverified {i + 1}/{len(names)} shards", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return report


def _check_shard(index: LatentIndex, i: int, exists: bool) -> list[str]:
    root, spec = index.root, index.card.spec
    row = index.shards.slice(i, 1).to_pylist()[0]
    url = root.url_of(row["name"])
    if not exists:
        return [f"{url}: missing ({row['num_samples']} samples)"]
    try:
        data = root.read_bytes(row["name"])
    except OSError as err:
        return [f"{url}: unreadable: {err}"]
    problems = []
    if len(data) != row["bytes"]:
        problems.append(f"{url}: size {len(data)} bytes, manifest says {row['bytes']} (truncated or replaced)")
    digest = hashlib.sha256(data).hexdigest()
    if digest != row["sha256"]:
        problems.append(f"{url}: sha256 {digest[:16]}... does not match the manifest's {row['sha256'][:16]}...")

    first, n = row["first_sample"], row["num_samples"]
    table = index.samples.slice(first, n).to_pydict()
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
