"""Which samples each step of an epoch holds, on a fixed number of logical streams.

Pure functions of (shard sizes, seed, epoch, streams S, global batch B, window): no I/O, no
clocks, no process ids - and neither the world size nor the DataLoader worker count, so a run
can resume with other counts of both (elastic resume).

1. Shards are permuted per (seed, epoch) and concatenated: the epoch's global sequence G
   (never built: `EpochPlan` holds the permutation and its running sums, O(shards), and
   materialises one stream window at a time).
2. The epoch has ``T = N // B`` steps. Stream s (of S) is the contiguous slice
   ``G[s*L : (s+1)*L]`` with ``L = T * g`` and ``g = B / S`` samples per stream per step; the last
   ``N - T*B`` samples of G (< B) wait for another epoch (G is permuted anew, so a different few).
3. Each stream is shuffled within windows of ``window`` samples (a multiple of g), seeded by
   (seed, epoch, S, stream, window index): the shuffle buffer.
4. Step t's global batch is, for s = 0..S-1 in order, samples ``[t*g, (t+1)*g)`` of stream s.

Layout (may change at every resume): rank r of W takes the contiguous block of S/W streams
``[r*S/W, (r+1)*S/W)``, so its batch is ``b = B/W`` samples. The block's streams are dealt to
the rank's K DataLoader workers round robin (worker k: the block's streams k, k+K, ...); each
worker emits, per step, its streams' part of the batch (a "piece", empty for a worker with no
stream), and the loader joins the K pieces of a step in worker order. So the samples of a
batch depend on (W, r) only; their order within the batch also on K.
Constraint: **W divides S, and S divides B** (and K <= S/W keeps every worker busy).
After k steps every stream has given exactly k*g samples, whatever the layout was, so the
position to resume from is one number (the step) and no sample is repeated or skipped.
"""

from __future__ import annotations

import math

import numpy as np


def _rng(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(w) & (2**63 - 1) for w in words])))


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    if not shuffle:
        return np.arange(num_shards)
    return _rng(seed, epoch, 0x5A4D).permutation(num_shards)


def steps_per_epoch(total: int, global_batch: int) -> int:
    return total // global_batch


def default_streams(world_size: int, workers: int, batch_size: int) -> int:
    """world_size x workers (one stream per worker) where the batch allows it, else fewer."""
    return world_size * math.gcd(workers, batch_size)


def check_layout(streams: int, world_size: int, batch_size: int) -> None:
    """Raise ValueError, saying what to change, unless W divides S and S divides B = W*b."""
    if streams % world_size:
        raise ValueError(
            f"{streams} logical streams cannot be shared by {world_size} ranks: the world size must divide "
            "the stream count (to resume on other world sizes, choose a stream count they all divide, e.g. 12)"
        )
    if (world_size * batch_size) % streams:
        raise ValueError(
            f"the global batch {world_size} x {batch_size} = {world_size * batch_size} is not a multiple of the "
            f"{streams} logical streams: every stream gives the same number of samples to each step"
        )


def stream_window(window_samples: int, samples_per_step: int) -> int:
    """The shuffle window of a stream: at least one step's samples, rounded down to whole steps."""
    return max(samples_per_step, window_samples // samples_per_step * samples_per_step)


class EpochPlan:
    """One epoch's order, planned at shard granularity and materialised a window at a time.

    Building it costs O(shards) (the shard permutation and its running sums); `window_rows`
    costs O(window + log shards). No N-long array is ever built, so a worker's plan is small
    whatever the dataset size. The order is exactly the one the module docstring defines.
    """

    def __init__(
        self,
        first_sample: np.ndarray,
        num_samples: np.ndarray,
        *,
        seed: int,
        epoch: int,
        num_streams: int,
        global_batch: int,
        window: int,
        shuffle: bool = True,
    ):
        if global_batch % num_streams:
            raise ValueError(f"global batch {global_batch} is not a multiple of {num_streams} streams")
        self.per_step = global_batch // num_streams  # g
        if window % self.per_step:
            raise ValueError(f"window {window} is not a multiple of the {self.per_step} samples per stream and step")
        self.seed, self.epoch, self.num_streams, self.window, self.shuffle = seed, epoch, num_streams, window, shuffle
        self.order = shard_order(len(num_samples), seed, epoch, shuffle)  # (shards,)
        self.shard_first = np.asarray(first_sample, dtype=np.int64)[self.order]  # first row of each shard of G
        counts = np.asarray(num_samples, dtype=np.int64)[self.order]
        self.ends = np.cumsum(counts)  # position in G after each shard of the order
        self.steps = steps_per_epoch(int(self.ends[-1]) if len(self.ends) else 0, global_batch)
        self.length = self.steps * self.per_step  # L: samples of each stream
        self.num_windows = -(-self.length // window)

    def sequence(self, start: int, stop: int) -> np.ndarray:
        """Rows (into samples.parquet) at positions [start, stop) of the epoch's sequence G."""
        if stop <= start:
            return np.empty(0, dtype=np.int64)
        lo = int(np.searchsorted(self.ends, start, side="right"))  # shard of G holding position start
        hi = int(np.searchsorted(self.ends, stop, side="left"))  # ... and stop - 1
        begins = np.concatenate([[0], self.ends])
        parts = [
            np.arange(max(start, begins[i]), min(stop, begins[i + 1])) - begins[i] + self.shard_first[i]
            for i in range(lo, hi + 1)
        ]
        return np.concatenate(parts).astype(np.int64, copy=False)

    def window_rows(self, stream: int, w: int) -> np.ndarray:
        """Rows of window ``w`` of ``stream``, shuffled: positions [w*window, (w+1)*window) of it."""
        begin = stream * self.length + w * self.window
        rows = self.sequence(begin, min(begin + self.window, (stream + 1) * self.length))
        if self.shuffle:
            rows = _rng(self.seed, self.epoch, self.num_streams, stream, w * self.window).permutation(rows)
        return rows

    def shards(self, streams) -> np.ndarray:
        """Indices of the shards that ``streams`` read from this epoch, sorted: O(streams log shards)."""
        found = []
        for s in streams:
            begin, stop = s * self.length, (s + 1) * self.length
            if stop > begin:
                lo = int(np.searchsorted(self.ends, begin, side="right"))
                hi = int(np.searchsorted(self.ends, stop, side="left"))
                found.append(self.order[lo : hi + 1])
        return np.unique(np.concatenate(found)) if found else np.empty(0, dtype=np.int64)


def epoch_streams(
    first_sample: np.ndarray,
    num_samples: np.ndarray,
    streams: range,
    *,
    seed: int,
    epoch: int,
    num_streams: int,
    global_batch: int,
    window: int,
    shuffle: bool = True,
) -> np.ndarray:
    """Rows of the logical ``streams`` (of ``num_streams``) in the order they are emitted:
    shape (len(streams), L); row i holds stream ``streams[i]``; ``window`` is a multiple of g.
    Whole streams at once (tests, tools); the reader walks an `EpochPlan` window by window."""
    plan = EpochPlan(
        first_sample,
        num_samples,
        seed=seed,
        epoch=epoch,
        num_streams=num_streams,
        global_batch=global_batch,
        window=window,
        shuffle=shuffle,
    )
    out = np.empty((len(streams), plan.length), dtype=np.int64)
    for i, s in enumerate(streams):
        for w in range(plan.num_windows):
            out[i, w * window : (w + 1) * window] = plan.window_rows(s, w)
    return out


def worker_streams(num_streams: int, world_size: int, rank: int, worker: int, workers: int) -> range:
    """The logical streams DataLoader worker ``worker`` of ``rank`` owns (possibly none)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    if not 0 <= worker < workers:
        raise ValueError(f"worker {worker} not in [0, {workers})")
    per_rank = num_streams // world_size
    return range(rank * per_rank + worker, (rank + 1) * per_rank, workers)
