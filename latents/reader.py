"""Streaming reader: a torch IterableDataset of batch pieces, and a loader with elastic resume.

Which samples each step holds is `latents.plan` (fixed logical streams, independent of the
world size and the worker count); here we fetch and decode them:

* Each DataLoader worker owns some logical streams and reads their shuffle windows as a few
  large byte-range requests (no tar parsing: the sample table holds every member's offset), on a
  thread pool that reads the next window while the current one is decoded, with bounded retries
  on transient errors, then an error naming the shard. It emits one *piece* per step (its
  streams' samples); `LatentLoader` joins a step's pieces into the rank's batch.
* **Memory:** a worker holds two windows (current and read-ahead) of each stream it owns:
  about ``2 * streams_per_worker * shuffle_buffer_bytes`` of compressed bytes, plus one decoded
  batch. With the defaults (64 MiB windows, streams = world size x workers: one stream per worker)
  that is 128 MiB per worker, 4 GiB for 8 ranks x 4 workers. (Smaller windows mean smaller range
  requests: on moto's S3 server 16 MiB windows read at ~60% of the speed of 64 MiB ones.)
* Per sample: flip f = bit of mix(seed, epoch, key) (p = 1/2); eps ~ N(0, I) from a torch
  generator seeded with the same mix; z = mean_f + std_f * eps, then the latent transform
  (`latents.autoencoder.LatentTransform`: the card's, e.g. times the SD scaling factor, unless
  another is given, e.g. the dataset-statistics one). **The reader applies the transform**; the
  trainer must not apply it again. Batches hold model-space latents (the transform's shape).
* Bad shards: ``bad_shard="fail"`` (default) raises `ShardError`; ``"skip"`` replaces each sample
  that cannot be read by a readable sample of the same window (the next one after it, cyclically;
  so that sample appears twice in the epoch), records (key, reason), and keeps every batch full:
  no batch is ever short or empty, and every rank keeps the same number of batches. Only a window
  with no readable sample at all (and no earlier piece to draw from) still raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import zstandard
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from latents.autoencoder import LatentNorm, LatentTransform
from latents.dataset import LatentIndex
from latents.format import (
    SAMPLES_NAME,
    STORED_POSTERIOR,
    DatasetError,
    ShardError,
    decode_frame,
    flip_frame,
    noise_seeds,
    sample_flips,
    sample_seeds,
    shard_name,
)
from latents.plan import (
    EpochPlan,
    check_layout,
    default_streams,
    steps_per_epoch,
    stream_window,
    worker_streams,
)
from latents.storage import StorageError
from latents.threads import one_thread

BAD_SHARD_POLICIES = ("fail", "skip")
DEFAULT_WINDOW_BYTES = 64 << 20  # shuffle window per stream (compressed bytes); a worker holds two
MAX_SKIP_RECORD = 1000  # (key, reason) pairs a loader keeps (and saves) of the samples it replaced


_READ_COLUMNS = ("key", "label", "shard", "offset", "size", "flip_offset", "key_hash")


@dataclass
class _Rows:
    """Sample-table columns of the shards one worker reads in one epoch, indexed by local row."""

    first: np.ndarray  # (shards,) first global row of each shard (the manifest's)
    base: np.ndarray  # (shards,) local row of each loaded shard's first sample; -1: not loaded
    labels: np.ndarray
    shard: np.ndarray
    offset: np.ndarray
    size: np.ndarray
    flip_offset: np.ndarray
    key_hash: np.ndarray
    key_ends: np.ndarray  # (rows + 1,) offsets of each local row's key in key_bytes
    key_bytes: np.ndarray  # the keys, UTF-8, one after another

    def local(self, rows: np.ndarray) -> np.ndarray:
        """Global sample rows -> local rows (every row's shard must be loaded)."""
        shard = np.searchsorted(self.first, rows, side="right") - 1
        return self.base[shard] + (rows - self.first[shard])

    def key(self, row: int) -> str:
        return self.key_bytes[self.key_ends[row] : self.key_ends[row + 1]].tobytes().decode()

    def keys(self, rows: np.ndarray) -> list[str]:
        return [self.key(r) for r in rows.tolist()]


def _owned(column: pa.ChunkedArray) -> np.ndarray:
    """A numeric column as a numpy array that owns its memory (no arrow buffer kept alive)."""
    return np.array(column.to_numpy(), copy=True)


def _string_parts(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A string column (no nulls) as (ends, bytes) numpy arrays owning their memory: value i is
    bytes[ends[i]:ends[i + 1]]."""
    lengths, data = [np.zeros(1, np.int64)], []
    for chunk in column.chunks:
        offsets = np.frombuffer(chunk.buffers()[1], np.int32)[chunk.offset : chunk.offset + len(chunk) + 1]
        lengths.append(np.diff(offsets).astype(np.int64))
        data.append(np.frombuffer(chunk.buffers()[2], np.uint8)[offsets[0] : offsets[-1]])
    return np.cumsum(np.concatenate(lengths)), np.concatenate([np.zeros(0, np.uint8), *data])


@dataclass
class _Chunk:
    """Consecutive samples of one shard fetched with one range request."""

    shard: int
    rows: np.ndarray  # sample rows in the chunk, consecutive
    start: int  # byte range [start, end) in the shard file
    end: int


class LatentDataset(IterableDataset):
    """Batches of (scaled) latents from a latent dataset URL; iterate it through `LatentLoader`.

    Iterated directly (or by a DataLoader with ``batch_size=None``) it yields one piece per step
    from each worker; with no workers a piece is the whole batch. Set ``epoch`` and
    ``start_batch`` (steps of the epoch to skip) first.

    Each batch is a dict: ``latents`` float32 (b, C, H, W), ``labels`` int64 (b,), ``flips``
    bool (b,), ``keys`` list of str, ``skipped`` list of (key, reason); b = batch_size always.

    Args:
        url: dataset root (local path, file://, s3://, gs://, memory://).
        batch_size: samples per batch, per rank (the global batch is world_size * batch_size).
        rank, world_size: this process's place among the data-parallel ranks.
        seed: shuffling, flips and noise derive from it (with the epoch and the key).
        shuffle: permute shards per epoch and shuffle within windows.
        random_flip: pick the stored mirror with p = 1/2 (else always the original image).
        sample_posterior: z = mean + std * eps (else the posterior mean).
        streams: logical streams the epoch's order is defined on (see `latents.plan`); world_size
            must divide it and it must divide the global batch. None: world_size x workers of the
            first run where the batch size allows (a resume adopts the saved count). Choose e.g.
            12 or 24 to be able to resume on 2, 3 or 4 ranks.
        shuffle_buffer_bytes: shuffle window of one stream in (compressed) bytes, rounded to
            whole steps; a worker holds two windows of each stream it owns (see Memory above).
        bad_shard: "fail" or "skip" (see the module docstring).
        io_threads: concurrent range requests per worker.
        chunk_bytes: largest single range request (a window is read as several, io_threads at a time).
        retries: attempts per request on transient storage errors.
        transform: stored -> model-space map (`LatentTransform`), or a `LatentNorm` (the card's own
            transform, or the one from its per-channel statistics); None: the card's own.
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
        streams: int | None = None,
        shuffle_buffer_bytes: int = DEFAULT_WINDOW_BYTES,
        bad_shard: str = "fail",
        io_threads: int = 4,
        chunk_bytes: int = 32 << 20,
        retries: int = 5,
        storage_options: dict | None = None,
        transform: LatentTransform | LatentNorm | None = None,
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
        norm = transform if isinstance(transform, LatentNorm) else LatentNorm.VAE
        self.transform = transform if isinstance(transform, LatentTransform) else self.card.model_transform(norm)
        self.model_shape = self.transform.model_shape(self.spec.latent_shape)  # (C, H, W) of the batches
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.shuffle, self.random_flip, self.sample_posterior = shuffle, random_flip, sample_posterior
        self.bad_shard, self.io_threads, self.chunk_bytes, self.retries = bad_shard, io_threads, chunk_bytes, retries
        self.global_batch = batch_size * world_size
        self.shuffle_buffer_bytes = shuffle_buffer_bytes
        self.streams: int | None = streams  # resolved by LatentLoader (or on first iteration)
        self.window: int | None = None  # samples per stream window; set with the stream count
        self.num_batches = steps_per_epoch(self.card.num_samples, self.global_batch)
        if self.num_batches == 0:
            raise ValueError(
                f"{url}: {self.card.num_samples} samples are fewer than world_size * batch_size "
                f"= {self.global_batch}: no rank would get a full batch"
            )
        self._first, self._count = self.index.shard_column("first_sample"), self.index.shard_column("num_samples")
        self._rows: _Rows | None = None  # the sample rows of the shards this worker reads this epoch
        # set by LatentLoader (or by hand) before iterating
        self.epoch = 0
        self.start_batch = 0  # steps of this epoch already consumed
        self._last_good: tuple[np.ndarray, np.ndarray] | None = None  # (rows, frames) of the last piece

    def __len__(self) -> int:
        return self.num_batches

    def set_layout(self, workers: int, streams: int | None = None, window: int | None = None) -> None:
        """Fix the stream count (default: kept, else `latents.plan.default_streams`) and the window;
        check that this rank's layout can share them (see `latents.plan.check_layout`)."""
        self.streams = streams or self.streams or default_streams(self.world_size, workers, self.batch_size)
        check_layout(self.streams, self.world_size, self.batch_size)
        per_step = self.global_batch // self.streams
        samples = int(self.shuffle_buffer_bytes / self.index.mean_sample_bytes)
        self.window = window or self.window or stream_window(samples, per_step)

    # ---- iteration (runs in the DataLoader worker) ---------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.streams is None or self.window is None:
            self.set_layout(workers)
        mine = worker_streams(self.streams, self.world_size, self.rank, worker, workers)
        plan = self.plan(self.epoch)
        per_step = self.global_batch // self.streams
        steps_per_window = self.window // per_step
        windows = range(self.start_batch // steps_per_window, -(-self.num_batches // steps_per_window))
        if not len(windows):
            return
        self._last_good = None
        self._rows = self.load_rows(plan, mine)

        def rows_of(w: int) -> np.ndarray:  # (streams of this worker, window): local row numbers
            width = min(self.window, plan.length - w * self.window)
            return np.array([self._rows.local(plan.window_rows(s, w)) for s in mine], dtype=np.int64).reshape(-1, width)

        with ThreadPoolExecutor(self.io_threads, thread_name_prefix="latent-read") as pool:
            ahead = rows_of(windows[0])
            pending = self._fetch(pool, ahead.ravel())
            for w in windows:
                rows, fetched = ahead, pending
                window_rows = rows.ravel()
                if w + 1 < windows.stop:  # read ahead while this window is decoded
                    ahead = rows_of(w + 1)
                    pending = self._fetch(pool, ahead.ravel())
                buffers, errors = self._collect(fetched)
                first = max(self.start_batch, w * steps_per_window)
                for t in range(first, min(self.num_batches, (w + 1) * steps_per_window)):
                    i = (t - w * steps_per_window) * per_step
                    yield self._decode(rows[:, i : i + per_step].ravel(), window_rows, buffers, errors)
        self._rows = None

    def plan(self, epoch: int) -> EpochPlan:
        """The epoch's order (see `latents.plan`): O(shards) to build."""
        if self.streams is None or self.window is None:
            self.set_layout(1)
        return EpochPlan(
            self._first,
            self._count,
            seed=self.seed,
            epoch=epoch,
            num_streams=self.streams,
            global_batch=self.global_batch,
            window=self.window,
            shuffle=self.shuffle,
        )

    def load_rows(self, plan: EpochPlan, streams) -> _Rows:
        """The sample rows of every shard ``streams`` read in ``plan``'s epoch: about
        N / (world size x workers) rows per worker (plus the shards cut at stream ends)."""
        shards = plan.shards(streams)
        try:
            table = self.index.read_samples(shards, list(_READ_COLUMNS))
        except StorageError as err:
            raise DatasetError(f"{self.index.root.url_of(SAMPLES_NAME)}: unreadable: {err}") from None
        base = np.full(len(self._count), -1, dtype=np.int64)  # local row of each loaded shard's first sample
        base[shards] = np.concatenate([[0], np.cumsum(self._count[shards])[:-1]]) if len(shards) else []
        # numpy arrays of their own, and no arrow buffer kept: the parquet reader's buffers
        # (sized for 64k-row batches) would otherwise pin several MiB of arrow's pool per worker
        key_ends, key_bytes = _string_parts(table.column("key"))
        rows = _Rows(
            first=self._first,
            base=base,
            labels=table.column("label").to_numpy().astype(np.int64),
            shard=_owned(table.column("shard")),
            offset=_owned(table.column("offset")),
            size=_owned(table.column("size")),
            flip_offset=_owned(table.column("flip_offset")),
            key_hash=_owned(table.column("key_hash")),
            key_ends=key_ends,
            key_bytes=key_bytes,
        )
        del table
        pa.default_memory_pool().release_unused()
        return rows

    def _chunks(self, rows: np.ndarray) -> list[_Chunk]:
        """Split a window's rows into range requests: per shard, consecutive rows, <= chunk_bytes."""
        chunks = []
        rows = np.sort(rows)
        breaks = np.flatnonzero((np.diff(rows) != 1) | (np.diff(self._rows.shard[rows]) != 0)) + 1
        for run in np.split(rows, breaks):
            ends = self._rows.offset[run] + self._rows.size[run]
            lo = 0
            while lo < len(run):
                limit = self._rows.offset[run[lo]] + self.chunk_bytes
                hi = max(lo + 1, int(np.searchsorted(ends, limit, side="right")))
                chunks.append(
                    _Chunk(
                        int(self._rows.shard[run[lo]]), run[lo:hi], int(self._rows.offset[run[lo]]), int(ends[hi - 1])
                    )
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
                if self._rows.offset[row] + self._rows.size[row] - chunk.start <= len(data):
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

    def _frame(self, row: int, flip: bool, buffers, errors: dict, decompressor) -> np.ndarray | None:
        """The stored (K, C, H, W) frame of ``row``'s flip, or None (with the reason in ``errors``)."""
        if row in errors:
            return None
        data, base = buffers[row]
        offset, size = int(self._rows.offset[row]) - base, int(self._rows.size[row])
        try:
            return decode_frame(
                flip_frame(data[offset : offset + size], flip, int(self._rows.flip_offset[row])),
                self.spec,
                decompressor,
            )
        except (ValueError, zstandard.ZstdError) as err:
            key = self._rows.key(row)
            errors[row] = f"{self.index.root.url_of(shard_name(int(self._rows.shard[row])))}: sample {key}: {err}"
            return None

    def _flip(self, rows: np.ndarray) -> np.ndarray:
        return sample_flips(sample_seeds(self.seed, self.epoch, self._rows.key_hash[rows])) & (
            self.random_flip and self.spec.flips
        )

    def _replace(self, row: int, window_rows: np.ndarray, buffers, errors, decompressor) -> tuple[int, np.ndarray]:
        """A readable sample to stand in for ``row``: the next readable one after it in its window
        (cyclically), else one of the previous piece; raises ShardError if there is none."""
        start = int(np.flatnonzero(window_rows == row)[0]) + 1
        for candidate in np.roll(window_rows, -start).tolist():
            frame = self._frame(candidate, bool(self._flip(np.array([candidate]))[0]), buffers, errors, decompressor)
            if frame is not None:
                return candidate, frame
        if self._last_good is not None:  # the whole window is unreadable: a sample of the previous piece
            rows, frames = self._last_good
            return int(rows[0]), frames[0]
        raise ShardError(f"{errors[row]}; and no readable sample in its window to replace it (bad_shard=skip)")

    def _decode(self, piece: np.ndarray, window_rows: np.ndarray, buffers, errors) -> dict:
        spec = self.spec
        decompressor = zstandard.ZstdDecompressor()
        stored = np.empty((len(piece), *spec.frame_shape), dtype=spec.storage_dtype)  # (b, K, C, H, W)
        rows, skipped = piece.copy(), []
        for i, (row, flip) in enumerate(zip(piece.tolist(), self._flip(piece).tolist(), strict=True)):
            frame = self._frame(row, flip, buffers, errors, decompressor)
            if frame is None:
                if self.bad_shard == "fail":
                    raise ShardError(errors[row])
                skipped.append((self._rows.key(row), errors[row]))
                rows[i], frame = self._replace(row, window_rows, buffers, errors, decompressor)
            stored[i] = frame
        if len(rows):
            self._last_good = (rows, stored[:1].copy())
        seeds = sample_seeds(self.seed, self.epoch, self._rows.key_hash[rows])
        flips = sample_flips(seeds) & (self.random_flip and spec.flips)
        stored_t = torch.from_numpy(stored)
        out = stored_t[:, 0].float()
        if spec.stored == STORED_POSTERIOR and self.sample_posterior:  # z = mean + std * eps
            eps = torch.empty((len(rows), *spec.latent_shape))
            generator = torch.Generator()
            for i, s in enumerate(noise_seeds(seeds)):
                generator.manual_seed(s)
                torch.randn(spec.latent_shape, generator=generator, out=eps[i])
            out.addcmul_(stored_t[:, 1].float(), eps)
        return {
            "latents": self.transform.to_model(out, inplace=True),
            "labels": torch.from_numpy(self._rows.labels[rows]),
            "flips": torch.from_numpy(flips),
            "keys": self._rows.keys(rows),
            "skipped": skipped,
        }


def _as_is(batch: dict) -> dict:
    # batches are built whole by the dataset; skip DataLoader's per-element conversion
    return batch


class LatentLoader:
    """Iterates a `LatentDataset` epoch by epoch through a DataLoader, with elastic resume.

    ``for batch in loader`` runs the rest of the current epoch (the same number of batches on
    every rank); the next ``for`` starts the next epoch. Each DataLoader worker emits its streams'
    piece of every step; the loader joins a step's pieces (in worker order) into the batch.

    ``state_dict()`` at any point records the epoch and the step (the same on every rank), the
    order's parameters (seed, streams, global batch, window, shuffle) and a bounded record of
    the samples a "skip" policy replaced. A new loader given that state continues with exactly
    the next step - with the same or another world size and worker count, as long as world_size x
    workers divides the stream count and the global batch is unchanged (checked): the batches
    before and after together hold exactly the epoch's samples. With the same layout they are
    bit-identical to an uninterrupted run (keys, flips and noise).
    """

    def __init__(self, dataset: LatentDataset, num_workers: int = 0, pin_memory: bool = False, **dataloader_kwargs):
        self.dataset = dataset
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.dataloader_kwargs = dataloader_kwargs
        self.epoch = 0
        self.batch = 0  # steps of the current epoch handed out so far
        self.skipped_count = 0  # samples a "skip" policy replaced, in all
        self.skipped: list[tuple[str, str]] = []  # (key, reason) of the first MAX_SKIP_RECORD of them
        dataset.set_layout(max(1, num_workers))

    def __len__(self) -> int:
        return self.dataset.num_batches

    def __iter__(self) -> Iterator[dict]:
        if self.batch >= len(self):
            self.epoch, self.batch = self.epoch + 1, 0
        ds = self.dataset
        ds.epoch, ds.start_batch = self.epoch, self.batch
        kwargs = {"worker_init_fn": one_thread, **self.dataloader_kwargs}  # latents.threads: one thread a worker
        loader = DataLoader(ds, batch_size=None, collate_fn=_as_is, num_workers=self.num_workers, **kwargs)
        pieces = []
        for piece in loader:
            pieces.append(piece)
            if len(pieces) < max(1, self.num_workers):
                continue
            batch = _join(pieces)
            pieces = []
            self.skipped_count += len(batch["skipped"])
            self.skipped.extend(batch.pop("skipped")[: MAX_SKIP_RECORD - len(self.skipped)])
            if self.pin_memory and torch.cuda.is_available():
                batch["latents"], batch["labels"] = batch["latents"].pin_memory(), batch["labels"].pin_memory()
            self.batch += 1
            yield batch
        if self.batch >= len(self):
            self.epoch, self.batch = self.epoch + 1, 0

    def _order(self) -> dict:
        """What defines the epoch's order: a resume must keep these."""
        ds = self.dataset
        return {
            "seed": ds.seed,
            "global_batch": ds.global_batch,
            "shuffle": ds.shuffle,
            "num_samples": ds.card.num_samples,
        }

    def state_dict(self) -> dict:
        ds = self.dataset
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            **self._order(),
            "streams": ds.streams,
            "window": ds.window,
            "world_size": ds.world_size,  # informational: a resume may use another layout
            "workers": max(1, self.num_workers),
            "skipped_count": self.skipped_count,
            "skipped": [list(s) for s in self.skipped],
        }

    def load_state_dict(self, state: dict) -> None:
        if "streams" not in state:
            raise ValueError("cannot resume the data position: the state was saved by a reader without logical streams")
        mine = self._order()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"cannot resume the data position exactly: the order changed ({detail})")
        if not 0 <= state["batch"] <= len(self):
            raise ValueError(f"saved batch {state['batch']} outside [0, {len(self)}]")
        self.dataset.set_layout(max(1, self.num_workers), int(state["streams"]), int(state["window"]))
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self.skipped_count = int(state.get("skipped_count", 0))
        self.skipped = [tuple(s) for s in state.get("skipped", [])]


def _join(pieces: list[dict]) -> dict:
    """One step's batch from its pieces, in worker order."""
    if len(pieces) == 1:
        return pieces[0]
    return {
        "latents": torch.cat([p["latents"] for p in pieces]),
        "labels": torch.cat([p["labels"] for p in pieces]),
        "flips": torch.cat([p["flips"] for p in pieces]),
        "keys": [k for p in pieces for k in p["keys"]],
        "skipped": [s for p in pieces for s in p["skipped"]],
    }
