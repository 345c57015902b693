"""Streaming reader: a torch IterableDataset of batches, and a loader with exact resume.

`LatentDataset` yields whole batches (use it through `LatentLoader`, or a DataLoader with
``batch_size=None``). Which samples come in what order is `latents.plan`; here we fetch and
decode them:

* Each worker reads its windows as a few large byte-range requests (no tar parsing: the sample
  table holds every member's offset), on a thread pool that reads the next window while the
  current one is decoded, with bounded retries, then an error naming the shard.
* Per sample: flip f = bit of mix(seed, epoch, key) (p = 1/2); eps ~ N(0, I) from a torch
  generator seeded with the same mix; z = mean_f + std_f * eps, times the card's scaling factor.
  **The reader applies the scaling factor**; the trainer must not apply it again.
* Bad shards: ``bad_shard="fail"`` (default) raises `ShardError`; ``"skip"`` drops the samples
  that cannot be read, records (key, reason) in the batch's "skipped" list, and keeps every
  rank's batch count unchanged (batches can then be shorter than batch_size).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import zstandard
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from latents.dataset import LatentIndex
from latents.format import STORED_POSTERIOR, ShardError, decode_frame, flip_frame, shard_name
from latents.plan import batches_per_rank, resume_assignment, worker_plan
from latents.storage import StorageError

BAD_SHARD_POLICIES = ("fail", "skip")


def _splitmix(x: np.ndarray) -> np.ndarray:
    # splitmix64 finaliser on uint64 arrays (wrapping arithmetic)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def sample_seeds(seed: int, epoch: int, key_hashes: np.ndarray) -> np.ndarray:
    """64-bit per-sample seeds, functions of (seed, epoch, key) only."""
    base = _splitmix(_splitmix(np.array([seed], dtype=np.uint64)) ^ np.uint64(epoch))
    return _splitmix(base ^ key_hashes.astype(np.uint64))


@dataclass
class _Chunk:
    """Consecutive samples of one shard fetched with one range request."""

    shard: int
    rows: np.ndarray  # sample rows in the chunk, consecutive
    start: int  # byte range [start, end) in the shard file
    end: int


class LatentDataset(IterableDataset):
    """Batches of (scaled) latents from a latent dataset URL.

    Iterate it through `LatentLoader` (which adds epochs and resume), or through a DataLoader
    with ``batch_size=None`` after setting ``epoch`` (and ``start_batch`` to skip batches).

    Each batch is a dict: ``latents`` float32 (b, C, H, W), ``labels`` int64 (b,), ``flips``
    bool (b,), ``keys`` list of str, ``skipped`` list of (key, reason). b = batch_size except
    where ``bad_shard="skip"`` dropped samples.

    Args:
        url: dataset root (local path, file://, s3://, gs://, memory://).
        batch_size: samples per batch, per rank.
        rank, world_size: this process's place among the data-parallel ranks.
        seed: shuffling, flips and noise derive from it (with the epoch and the key).
        shuffle: permute shards per epoch and shuffle within windows.
        random_flip: pick the stored mirror with p = 1/2 (else always the original image).
        sample_posterior: z = mean + std * eps (else the posterior mean).
        shuffle_buffer_bytes: size of a shuffle window in (compressed) bytes, rounded to whole
            batches; a worker holds about two windows (current and read-ahead) in memory.
        bad_shard: "fail" or "skip" (see the module docstring).
        io_threads: concurrent range requests per worker.
        chunk_bytes: largest single range request.
        retries: attempts per request on transient storage errors.
    """

    def __init__(
        self,
        url: str,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        random_flip: bool = True,
        sample_posterior: bool = True,
        shuffle_buffer_bytes: int = 1 << 30,
        bad_shard: str = "fail",
        io_threads: int = 4,
        chunk_bytes: int = 32 << 20,
        retries: int = 5,
        storage_options: dict | None = None,
    ):
        super().__init__()
        if bad_shard not in BAD_SHARD_POLICIES:
            raise ValueError(f"bad_shard must be one of {', '.join(BAD_SHARD_POLICIES)}, not {bad_shard!r}")
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need batch_size >= 1 and 0 <= rank < world_size (got {batch_size}, {rank}, {world_size})"
            )
        self.index = LatentIndex.open(url, storage_options, attempts=retries)
        self.card = self.index.card
        self.spec = self.card.spec
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.shuffle, self.random_flip, self.sample_posterior = shuffle, random_flip, sample_posterior
        self.bad_shard, self.io_threads, self.chunk_bytes, self.retries = bad_shard, io_threads, chunk_bytes, retries
        per_window = max(1, int(shuffle_buffer_bytes / self.index.mean_sample_bytes) // batch_size)
        self.window = per_window * batch_size
        self.num_batches = batches_per_rank(self.card.num_samples, world_size, batch_size)
        if self.num_batches == 0:
            raise ValueError(
                f"{url}: {self.card.num_samples} samples are fewer than world_size * batch_size "
                f"= {world_size * batch_size}: no rank would get a full batch"
            )
        idx = self.index
        self._first, self._count = idx.shard_column("first_sample"), idx.shard_column("num_samples")
        self._labels, self._shard = idx.sample_column("label").astype(np.int64), idx.sample_column("shard")
        self._offset, self._size, self._flip_offset = (
            idx.sample_column("offset"),
            idx.sample_column("size"),
            idx.sample_column("flip_offset"),
        )
        self._key_hash = idx.sample_column("key_hash")
        self._keys = idx.samples.column("key").combine_chunks()
        # set by LatentLoader (or by hand) before iterating
        self.epoch = 0
        self.start_batch = 0  # rank-level batches of this epoch already consumed

    def __len__(self) -> int:
        return self.num_batches

    # ---- iteration (runs in the DataLoader worker) ---------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        logical, first_batch = resume_assignment(self.start_batch, workers, physical)
        plan = worker_plan(
            self._first,
            self._count,
            seed=self.seed,
            epoch=self.epoch,
            world_size=self.world_size,
            rank=self.rank,
            workers=workers,
            worker=logical,
            batch_size=self.batch_size,
            window=self.window,
            shuffle=self.shuffle,
        )
        windows = list(plan.windows(first_batch))
        if not windows:
            return
        with ThreadPoolExecutor(self.io_threads, thread_name_prefix="latent-read") as pool:
            pending = self._fetch(pool, windows[0][0])
            for i, (rows, skip) in enumerate(windows):
                fetched = pending
                if i + 1 < len(windows):  # read ahead while this window is decoded
                    pending = self._fetch(pool, windows[i + 1][0])
                buffers, errors = self._collect(fetched)
                for b in range(skip, len(rows) // self.batch_size):
                    yield self._decode(rows[b * self.batch_size : (b + 1) * self.batch_size], buffers, errors)

    def _chunks(self, rows: np.ndarray) -> list[_Chunk]:
        """Split a window's rows into range requests: per shard, consecutive rows, <= chunk_bytes."""
        chunks = []
        rows = np.sort(rows)
        breaks = np.flatnonzero((np.diff(rows) != 1) | (np.diff(self._shard[rows]) != 0)) + 1
        for run in np.split(rows, breaks):
            ends = self._offset[run] + self._size[run]
            lo = 0
            while lo < len(run):
                limit = self._offset[run[lo]] + self.chunk_bytes
                hi = max(lo + 1, int(np.searchsorted(ends, limit, side="right")))
                chunks.append(
                    _Chunk(int(self._shard[run[lo]]), run[lo:hi], int(self._offset[run[lo]]), int(ends[hi - 1]))
                )
                lo = hi
        return chunks

    def _fetch(self, pool: ThreadPoolExecutor, rows: np.ndarray) -> list[tuple[_Chunk, Future]]:
        return [(c, pool.submit(self._read_chunk, c)) for c in self._chunks(rows)]

    def _read_chunk(self, chunk: _Chunk) -> bytes:
        """The chunk's bytes; shorter than asked if the shard is truncated (see `_collect`)."""
        root, name = self.index.root, shard_name(chunk.shard)
        try:
            return root.read_bytes(name, chunk.start, chunk.end)
        except FileNotFoundError:
            raise ShardError(f"{root.url_of(name)}: shard is missing") from None
        except StorageError as err:
            raise ShardError(f"{root.url_of(name)}: unreadable: {err}") from None

    def _collect(self, fetched) -> tuple[dict[int, tuple[memoryview, int]], dict[int, str]]:
        """Row -> (its chunk's bytes, the chunk's start offset); rows that cannot be read -> reason."""
        buffers, errors = {}, {}
        for chunk, future in fetched:
            try:
                data = future.result()
            except ShardError as err:
                if self.bad_shard == "fail":
                    raise
                errors.update(dict.fromkeys(chunk.rows.tolist(), str(err)))
                continue
            view = memoryview(data)  # slices below do not copy
            for row in chunk.rows.tolist():
                if self._offset[row] + self._size[row] - chunk.start <= len(data):
                    buffers[row] = (view, chunk.start)
                    continue
                reason = (
                    f"{self.index.root.url_of(shard_name(chunk.shard))}: truncated: bytes "
                    f"[{chunk.start}, {chunk.end}) requested, {len(data)} returned"
                )
                if self.bad_shard == "fail":
                    raise ShardError(reason)
                errors[row] = reason
        return buffers, errors

    def _decode(self, rows: np.ndarray, buffers, errors) -> dict:
        spec = self.spec
        seeds = sample_seeds(self.seed, self.epoch, self._key_hash[rows])
        flips = (seeds >> np.uint64(63)).astype(bool) & (self.random_flip and spec.flips)
        torch_seeds = (seeds & np.uint64(2**63 - 1)).tolist()
        keys = self._keys.take(rows).to_pylist()
        # member start (relative to its chunk), size and flip-1 frame offset of every sample
        offsets, sizes, flip_offsets = self._offset[rows], self._size[rows], self._flip_offset[rows]
        stored = np.empty((len(rows), *spec.frame_shape), dtype=spec.storage_dtype)  # (B, K, C, H, W)
        posterior = spec.stored == STORED_POSTERIOR and self.sample_posterior
        eps = torch.empty((len(rows), *spec.latent_shape)) if posterior else None
        decompressor, generator = zstandard.ZstdDecompressor(), torch.Generator()
        keep, skipped = [], []
        for i, (row, offset, size, flip, flip_offset) in enumerate(
            zip(rows.tolist(), offsets.tolist(), sizes.tolist(), flips.tolist(), flip_offsets.tolist(), strict=True)
        ):
            if row in errors:
                skipped.append((keys[i], errors[row]))
                continue
            data, base = buffers[row]
            member = data[offset - base : offset - base + size]
            try:
                stored[len(keep)] = decode_frame(flip_frame(member, flip, flip_offset), spec, decompressor)
            except (ValueError, zstandard.ZstdError) as err:
                reason = f"{self.index.root.url_of(shard_name(int(self._shard[row])))}: sample {keys[i]}: {err}"
                if self.bad_shard == "fail":
                    raise ShardError(reason) from None
                skipped.append((keys[i], reason))
                continue
            if posterior:
                generator.manual_seed(torch_seeds[i])
                torch.randn(spec.latent_shape, generator=generator, out=eps[len(keep)])
            keep.append(i)
        n = len(keep)
        stored_t = torch.from_numpy(stored[:n])
        out = stored_t[:, 0].float()
        if posterior:  # z = mean + std * eps
            out.addcmul_(stored_t[:, 1].float(), eps[:n])
        out.mul_(self.card.scaling_factor)
        return {
            "latents": out,
            "labels": torch.from_numpy(self._labels[rows][keep]),
            "flips": torch.from_numpy(flips[keep]),
            "keys": [keys[i] for i in keep],
            "skipped": skipped,
        }


def _as_is(batch: dict) -> dict:
    # batches are built whole by the dataset; skip DataLoader's per-element conversion
    return batch


class LatentLoader:
    """Iterates a `LatentDataset` epoch by epoch through a DataLoader, with exact resume.

    ``for batch in loader`` runs the rest of the current epoch (the same number of batches on
    every rank); the next ``for`` starts the next epoch. ``state_dict()`` at any point records
    the epoch and how many batches were handed out; a new loader given that state continues
    with exactly the next batch (same keys, flips and noise). Resuming requires the same seed,
    world size, rank, batch size and number of workers (checked).
    """

    def __init__(self, dataset: LatentDataset, num_workers: int = 0, pin_memory: bool = False, **dataloader_kwargs):
        self.dataset = dataset
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.dataloader_kwargs = dataloader_kwargs
        self.epoch = 0
        self.batch = 0  # batches of the current epoch handed out so far
        self.skipped: list[tuple[str, str]] = []  # (key, reason) of samples a "skip" policy dropped

    def __len__(self) -> int:
        return self.dataset.num_batches

    def __iter__(self) -> Iterator[dict]:
        if self.batch >= len(self):
            self.epoch, self.batch = self.epoch + 1, 0
        ds = self.dataset
        ds.epoch, ds.start_batch = self.epoch, self.batch
        loader = DataLoader(
            ds,
            batch_size=None,
            collate_fn=_as_is,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            **self.dataloader_kwargs,
        )
        for batch in loader:
            self.skipped.extend(batch.pop("skipped"))
            self.batch += 1
            yield batch
        if self.batch >= len(self):
            self.epoch, self.batch = self.epoch + 1, 0

    def _layout(self) -> dict:
        ds = self.dataset
        return {
            "seed": ds.seed,
            "world_size": ds.world_size,
            "rank": ds.rank,
            "batch_size": ds.batch_size,
            "workers": max(1, self.num_workers),
            "window": ds.window,
            "shuffle": ds.shuffle,
            "num_samples": ds.card.num_samples,
        }

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, **self._layout()}

    def load_state_dict(self, state: dict) -> None:
        mine = self._layout()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"cannot resume the data position exactly: the layout changed ({detail})")
        if not 0 <= state["batch"] <= len(self):
            raise ValueError(f"saved batch {state['batch']} outside [0, {len(self)}]")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
