"""Which samples each rank and DataLoader worker reads in an epoch, and in what order.

Pure functions of (shard sizes, seed, epoch, world size, rank, workers, batch size, window):
no I/O, no clocks, no process ids.

1. Shards are permuted per (seed, epoch) and concatenated: the epoch's global sequence G.
2. Each rank takes a contiguous slice of G of ``batches_per_rank * batch_size`` samples, with
   ``batches_per_rank = N // (world_size * batch_size)``: every rank gets the same number of
   full batches, and the last ``N mod (world_size * batch_size)`` samples of G are left out of
   this epoch. G is permuted anew each epoch, so a different few are left out each time.
3. The rank's batches j = 0, 1, ... are dealt to W logical workers round robin (j mod W), which
   is the order in which torch's DataLoader collects worker batches; logical worker l reads a
   contiguous part of the rank's slice, so workers never read the same bytes.
4. Within a worker's part, samples are shuffled in windows of ``window`` samples (a multiple of
   the batch size): the shuffle buffer, spanning several shards when shards are smaller.

Resume: after the rank consumed k batches, physical worker p plays logical worker (k + p) mod W
from its local batch (k + p) // W; the DataLoader then yields exactly batches k, k+1, ...
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _rng(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(w) & (2**63 - 1) for w in words])))


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    if not shuffle:
        return np.arange(num_shards)
    return _rng(seed, epoch, 0x5A4D).permutation(num_shards)


def global_sequence(first_sample: np.ndarray, num_samples: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Sample rows (into samples.parquet) of the shards in ``order``, concatenated."""
    return np.concatenate([np.arange(first_sample[s], first_sample[s] + num_samples[s]) for s in order])


def batches_per_rank(total: int, world_size: int, batch_size: int) -> int:
    return total // (world_size * batch_size)


def worker_batches(num_batches: int, workers: int, worker: int) -> int:
    """Batches logical worker ``worker`` produces when the rank's batches are dealt round robin."""
    return max(0, -(-(num_batches - worker) // workers))


@dataclass(frozen=True)
class WorkerPlan:
    """One logical worker's samples for an epoch: rows in output order, cut into windows."""

    rows: np.ndarray  # sample rows in the order they are emitted (shuffled within windows)
    window: int  # samples per window
    batch_size: int

    @property
    def num_batches(self) -> int:
        return len(self.rows) // self.batch_size

    def windows(self, start_batch: int = 0):
        """(rows of a window, batches of it to skip) for each window from local batch start_batch on."""
        per_window = self.window // self.batch_size
        for w in range(start_batch // per_window, -(-self.num_batches // per_window)):
            yield self.rows[w * self.window : (w + 1) * self.window], max(0, start_batch - w * per_window)


def worker_plan(
    first_sample: np.ndarray,
    num_samples: np.ndarray,
    *,
    seed: int,
    epoch: int,
    world_size: int,
    rank: int,
    workers: int,
    worker: int,
    batch_size: int,
    window: int,
    shuffle: bool = True,
) -> WorkerPlan:
    """The samples logical ``worker`` (of ``workers``, >= 1) of ``rank`` emits in ``epoch``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    if not 0 <= worker < workers:
        raise ValueError(f"worker {worker} not in [0, {workers})")
    window = max(batch_size, window // batch_size * batch_size)
    order = shard_order(len(num_samples), seed, epoch, shuffle)
    sequence = global_sequence(first_sample, num_samples, order)
    nb = batches_per_rank(len(sequence), world_size, batch_size)
    rank_rows = sequence[rank * nb * batch_size : (rank + 1) * nb * batch_size]
    start = sum(worker_batches(nb, workers, w) for w in range(worker)) * batch_size
    rows = rank_rows[start : start + worker_batches(nb, workers, worker) * batch_size].copy()
    if shuffle:
        for w in range(0, len(rows), window):
            # seeded by the window's place in G: independent of everything but the layout
            rows[w : w + window] = _rng(seed, epoch, world_size, rank, workers, worker, w).permutation(
                rows[w : w + window]
            )
    return WorkerPlan(rows, window, batch_size)


def resume_assignment(consumed: int, workers: int, physical: int) -> tuple[int, int]:
    """(logical worker, first local batch) for physical worker ``physical`` after ``consumed``
    rank-level batches, so that round-robin collection continues with batch ``consumed``."""
    j = consumed + physical
    return j % workers, j // workers
