"""How many threads torch uses in each process we start: one owner for the policy.

On a shared or loaded machine, more compute threads than free cores do not share the cores:
OpenMP threads spin-wait at every parallel region's barrier, so a 2-thread VAE fit on a 2-core
machine with one other busy process ran ~7x slower than alone (BENCHMARKS.md), where one thread
ran 1.25x slower. So every process sets its thread count explicitly:

* the `sit` command's own process (demo steps, the trainer, `sit sample --grid`, `sit eval`):
  `default_threads()` - half the CPUs this process may run on, at least 1; ``SIT_TORCH_THREADS``
  (or the standard ``OMP_NUM_THREADS``) overrides it, e.g. the core count on a machine of your own;
* Ray actors: their CPU reservation (``--cpus-per-worker``), set in the actor;
* DataLoader workers: 1 (`one_thread`, their ``worker_init_fn``; they decode, the model runs in the
  main process).
"""

from __future__ import annotations

import os

THREADS_ENV = "SIT_TORCH_THREADS"


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """``SIT_TORCH_THREADS`` if set, else ``OMP_NUM_THREADS`` (torchrun sets it to 1 for several
    ranks), else half the usable CPUs, at least 1."""
    name = THREADS_ENV if os.environ.get(THREADS_ENV) else "OMP_NUM_THREADS"
    value = os.environ.get(name)
    if value:
        try:
            threads = int(value)
        except ValueError:
            threads = 0
        if threads < 1:
            raise ValueError(f"{name}={value!r}: expected a positive integer")
        return threads
    return max(1, usable_cpus() // 2)


def set_torch_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads (``threads`` or `default_threads`); returns the number set."""
    import torch

    n = max(1, threads if threads is not None else default_threads())
    torch.set_num_threads(n)
    return n


def one_thread(_worker_id: int = 0) -> None:
    """``worker_init_fn`` of DataLoader workers: one torch thread each."""
    set_torch_threads(1)
