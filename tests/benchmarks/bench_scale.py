"""Index, writer, verifier and reader at ImageNet scale and beyond, on tiny latents.

For each N (default 1.28M and 5M) a dataset of N tiny-latent samples (1x1x1, one sampled
latent, no flip: 2 KiB of tar per sample) is built in a temporary folder - shards laid out by
`tests.latents.fast_shards` (the bytes `write_shard` writes), the index written by the real
`latents.writer.finalize`, streaming - and deleted at the end. Each figure is measured in a fresh
subprocess, so that peak RSS (ru_maxrss) is its own:

* writer: peak RSS of the process that writes every shard and then finalizes (`finalize_s`).
* verify: `latents.verify.verify` with ``--verify-workers`` processes: time, MB/s, peak RSS of
  the main process and of the largest worker.
* reader, rank 0 of world sizes 8 and 256 (one process, no DataLoader worker; S = W streams,
  32 samples per rank and step, 1 MiB windows): construction time (`LatentDataset` +
  `LatentLoader`), first-batch time, and the index memory of the rank: VmRSS with the rank's
  per-sample index for epoch 0 loaded (`LatentDataset.load_rows` for its streams, what its
  iteration loads; before issue 15 the whole index, loaded at construction) minus VmRSS before
  (after the imports and a first batch of a 2-shard dataset with shards of the measured size,
  which brings in every lazy import and grows arrow's pool and the parquet decoder's buffers to
  one row group's size: a fixed cost of ~2 MiB per process at 8192 samples per shard, whatever
  the dataset and world size), both after returning freed memory to the system
  (`settled_rss_mib`); and the bytes
  the index holds, exactly (``index_held_mib``: tracemalloc's count of numpy and Python
  allocations plus arrow's allocated bytes), which has none of the allocators' page noise.
  ``--arrow-pool system`` gives arrow glibc's malloc in the reader processes (mimalloc, its
  default, keeps several MiB of freed pages that `settled_rss_mib` cannot return). ``--code DIR``
  runs the reader from another tree (e.g. /work/main: the "before" figures); its lines carry
  ``"code": DIR``.
* plan time per worker: building epoch 1's plan for rank 0's stream and materialising its
  first window (`latents.plan.EpochPlan`); on a tree without it, `epoch_streams` for that stream
  (what a worker computed at every epoch start before).
* encode: ``tests.benchmarks.scale_encode.encode_figures(n, workdir)`` if that module exists.

Prints one JSON line per figure.

    python -m tests.benchmarks.bench_scale [--sizes 1280000 5000000] [--code /work/main] [--workdir /tmp]
        [--skip-verify] [--skip-encode]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PER_SHARD = 8192  # samples per shard, as ImageNet at 256 px (157 shards at 1.28M)
BATCH = 32  # per rank and step
WINDOW_BYTES = 1 << 20


def vm_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def settled_rss_mib() -> float:
    """VmRSS after returning freed memory to the system (Python, arrow's pool, glibc): what is
    still in use, without the allocators' retained pages (several MiB of noise otherwise)."""
    import ctypes
    import gc

    import pyarrow as pa

    gc.collect()
    pa.default_memory_pool().release_unused()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return vm_rss_mib()


def peak_rss_mib(who: int = 0) -> float:
    """This process's peak RSS (VmHWM), or its children's largest (ru_maxrss). Not ru_maxrss for
    itself: Linux carries the RSS of the process that spawned it over exec into it, so a child of
    a grown parent (e.g. after the in-process encode figures) would report the parent's size."""
    import resource

    if who:
        return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


# ---- the measurements, each run in its own subprocess: `python -m tests.benchmarks.bench_scale --child WHAT ...`


def child_write(url: str, n: int) -> dict:
    from tests.latents import fast_shards

    base = vm_rss_mib()
    start = time.perf_counter()
    fast_shards.write_dataset(url, n, PER_SHARD)
    return {"write_s": time.perf_counter() - start, "peak_rss_mib": peak_rss_mib(), "imports_rss_mib": base}


def child_verify(url: str, workers: int) -> dict:
    from latents.verify import verify

    base = vm_rss_mib()
    report = verify(url, workers=workers)
    assert report.ok, report.problems[:3]
    return {
        "verify_s": report.seconds,
        "mb_per_s": report.mb_per_s,
        "samples": report.samples_checked,
        "peak_rss_mib": peak_rss_mib(),
        "worker_peak_rss_mib": peak_rss_mib(1),
        "imports_rss_mib": base,
    }


def child_reader(url: str, world: int, warm: str) -> dict:
    import tracemalloc

    import pyarrow as pa
    import torch

    import latents.plan as plan
    from latents.reader import LatentDataset, LatentLoader

    torch.set_num_threads(1)
    if os.environ.get("BENCH_ARROW_POOL") == "system":  # glibc malloc: trimmed back, so RSS tracks what is held
        pa.set_memory_pool(pa.system_memory_pool())
    imports = vm_rss_mib()
    warmup = LatentLoader(LatentDataset(warm, BATCH, seed=0, shuffle_buffer_bytes=WINDOW_BYTES))
    next(iter(warmup))  # every code path once: lazy imports, arrow and zstd pools are not the index
    del warmup
    base = settled_rss_mib()
    arrow_base = pa.total_allocated_bytes()
    tracemalloc.start()  # numpy arrays and Python objects; arrow's own allocations counted apart
    start = time.perf_counter()
    ds = LatentDataset(url, BATCH, rank=0, world_size=world, seed=0, streams=world, shuffle_buffer_bytes=WINDOW_BYTES)
    loader = LatentLoader(ds)
    built = time.perf_counter() - start
    rows = None
    if hasattr(ds, "load_rows"):  # the index of the rank's streams for epoch 0, as its iteration loads it
        rows = ds.load_rows(ds.plan(0), plan.worker_streams(world, world, 0, 0, 1))  # noqa: F841 (held)
    index_rss = settled_rss_mib() - base  # before: every rank loaded the whole index at construction
    index_bytes = (tracemalloc.get_traced_memory()[0] + pa.total_allocated_bytes() - arrow_base) / 2**20
    tracemalloc.stop()
    start = time.perf_counter()
    next(iter(loader))
    first = time.perf_counter() - start
    first_sample = ds.index.shard_column("first_sample")
    counts = ds.index.shard_column("num_samples")
    kwargs = {"seed": 0, "epoch": 1, "num_streams": world, "global_batch": world * BATCH, "window": ds.window}
    start = time.perf_counter()
    if hasattr(plan, "EpochPlan"):
        p = plan.EpochPlan(first_sample, counts, **kwargs)
        p.shards([0])
        p.window_rows(0, 0)
    else:  # before: the N-long global sequence, then the worker's stream
        plan.epoch_streams(first_sample, counts, range(1), **kwargs)
    plan_s = time.perf_counter() - start
    return {
        "construct_s": built,
        "first_batch_s": first,
        "index_rss_mib": index_rss,
        "index_held_mib": index_bytes,
        "peak_rss_mib": peak_rss_mib(),
        "imports_rss_mib": imports,
        "warm_rss_mib": base,
        "plan_s": plan_s,
        "shards": len(counts),
        "window": int(ds.window),
    }


def run_child(args: list[str], code: Path = ROOT, pool: str = "default") -> dict:
    env = {**os.environ, "PYTHONPATH": f"{code}:{ROOT}", "OMP_NUM_THREADS": "1", "BENCH_ARROW_POOL": pool}
    done = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.bench_scale", "--child", *args],
        cwd=code,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"child {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def rounded(d: dict) -> dict:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in d.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_280_000, 5_000_000])
    parser.add_argument("--worlds", type=int, nargs="+", default=[8, 256])
    parser.add_argument("--verify-workers", type=int, default=2)
    parser.add_argument("--code", type=Path, nargs="*", default=[], help="other trees to run the reader from")
    parser.add_argument("--workdir", default=None, help="where the temporary datasets go (default: $TMPDIR)")
    parser.add_argument("--label", default="current")
    parser.add_argument("--skip-verify", action="store_true", help="build the datasets for the reader figures only")
    parser.add_argument("--skip-encode", action="store_true", help="no encode figures (scale_encode)")
    parser.add_argument("--reader-repeats", type=int, default=1, help="reader figures per world size (fresh processes)")
    parser.add_argument(
        "--arrow-pool",
        choices=["default", "system"],
        default="default",
        help="arrow's allocator in the reader processes (default: mimalloc, which keeps freed pages)",
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from tests.latents import fast_shards

    if args.child:
        what, url, number, *more = args.child
        fn = {"write": child_write, "verify": child_verify, "reader": child_reader}[what]
        print(json.dumps(fn(url, int(number), *more)))
        return

    common = {
        "benchmark": "scale_tiny_latents",
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "date": date.today().isoformat(),
        "label": args.label,
        "per_shard": PER_SHARD,
    }

    def emit(figure: str, n: int, values: dict, **extra) -> None:
        load = round(os.getloadavg()[0], 1)
        print(
            json.dumps({**common, "figure": figure, "n": n, **extra, **rounded(values), "load_1min": load}), flush=True
        )

    for n in args.sizes:
        tmp = tempfile.mkdtemp(prefix="sit-bench-scale-", dir=args.workdir)
        try:
            url, warm = f"{tmp}/ds", f"{tmp}/warm"
            fast_shards.write_dataset(warm, 2 * PER_SHARD, PER_SHARD)  # row groups as large as the measured ones
            emit("writer", n, run_child(["write", url, str(n)]))
            if not args.skip_verify:
                emit("verify", n, run_child(["verify", url, str(args.verify_workers)]), workers=args.verify_workers)
            pool = {"arrow_pool": args.arrow_pool}
            for world in [w for w in args.worlds for _ in range(args.reader_repeats)]:
                for code in [ROOT, *args.code]:
                    tag = {} if code == ROOT else {"code": str(code)}
                    result = run_child(["reader", url, str(world), warm], code, args.arrow_pool)
                    emit("reader_rank0", n, result, world=world, **tag, **pool)
            if args.skip_encode:
                continue
            try:
                from tests.benchmarks.scale_encode import encode_figures
            except ImportError:
                emit("encode", n, {"skipped": "tests/benchmarks/scale_encode.py is not in this tree"})
            else:
                for figure in encode_figures(n, tmp):
                    print(json.dumps({**common, "n": n, **figure}), flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
