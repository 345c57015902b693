"""Reader throughput on one core: our latent shards vs one .npy file per sample.

The baseline is the common fast-DiT recipe: one float32 .npy per sample (a single sampled
latent, 1x4x32x32) plus one .npy per label, read by a map-style Dataset through a shuffling
DataLoader (two file reads per sample). Ours reads the full format (posterior mean + std of
both flips, float16, zstd) and does strictly more work per sample: pick a flip, decode it,
draw the posterior noise, scale.

Both read from local disk (page cache warm: the second of two epochs is timed) and from moto's
S3 server in its own process. The reading process is pinned to CPU 0 with one torch thread; the
server to CPU 1. Also measured for ours: the first-batch latency (a fresh loader, until its first
batch) and the peak RSS of one DataLoader worker over an epoch (VmRSS of /proc/PID/status,
polled every 10 ms), started with "spawn" so that none of the parent's pages are counted (its
imports - torch, pyarrow - are). Prints one JSON line per figure; ``--label`` tags them (to
compare two versions of the reader, run one after the other with PYTHONPATH pointing at each).

    python -m tests.benchmarks.bench_reader [--local-samples 20000] [--s3-samples 3000] [--label x]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import fsspec
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from latents.format import LatentSpec
from latents.reader import LatentDataset, LatentLoader
from latents.writer import DatasetWriter
from tests.moto_s3 import s3_environment, start_moto_server

SHAPE = (4, 32, 32)  # 256 px images through the SD VAE
BATCH = 256


def smooth_field(rng: np.random.Generator, shape, passes: int = 2) -> np.ndarray:
    """Spatially correlated noise: a stand-in for VAE latents (real ones compress differently)."""
    x = rng.standard_normal(shape).astype(np.float32)
    for _ in range(passes):
        x = (x + np.roll(x, 1, -1) + np.roll(x, -1, -1) + np.roll(x, 1, -2) + np.roll(x, -1, -2)) / 5 * 2.2
    return x


def synthetic_sample(rng: np.random.Generator) -> np.ndarray:
    """(2 flips, [mean, std], C, H, W): means ~ +-5 with structure, posterior stds ~ e^-4."""
    mean = smooth_field(rng, SHAPE) * 5
    std = np.exp(-4 + 0.3 * smooth_field(rng, SHAPE))
    both = np.stack([mean, std])
    return np.stack([both, both[..., ::-1]]).astype(np.float16)


def write_ours(url: str, n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    spec = LatentSpec(SHAPE)
    with DatasetWriter(url, spec, resolution=256, vae="synthetic", scaling_factor=0.18215, num_classes=1000) as w:
        for i in range(n):
            w.add(f"n{i % 1000:08d}/{i:08d}", i % 1000, synthetic_sample(rng))
    return {
        "bytes_per_sample": w.card.total_bytes / n,
        "compression_ratio": spec.raw_sample_bytes * n / w.card.total_bytes,
    }


def write_npy_files(url: str, n: int, seed: int = 0) -> None:
    """fast-DiT layout: features/{i}.npy (1, 4, 32, 32) float32 and labels/{i}.npy."""
    rng = np.random.default_rng(seed)
    fs, root = fsspec.core.url_to_fs(url)
    for sub in ("features", "labels"):
        fs.makedirs(f"{root}/{sub}", exist_ok=True)
    for i in range(n):
        sample = synthetic_sample(rng)[0, 0:1].astype(np.float32)  # one latent, as fast-DiT stores
        for sub, array in (("features", sample), ("labels", np.array([i % 1000]))):
            buf = io.BytesIO()
            np.save(buf, array)
            fs.pipe_file(f"{root}/{sub}/{i}.npy", buf.getvalue())


class NpyFiles(Dataset):
    """The baseline reader (fast-DiT's CustomDataset over any fsspec URL)."""

    def __init__(self, url: str, n: int):
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.local = "file" in self.fs.protocol
        self.n = n

    def __len__(self) -> int:
        return self.n

    def load(self, path: str) -> np.ndarray:
        if self.local:  # exactly fast-DiT: np.load on a path
            return np.load(path)
        return np.load(io.BytesIO(self.fs.cat_file(path)))

    def __getitem__(self, i: int):
        feature = self.load(f"{self.root}/features/{i}.npy")
        label = self.load(f"{self.root}/labels/{i}.npy")
        return torch.from_numpy(feature), torch.from_numpy(label)


def time_epochs(make_iter, epochs: int) -> tuple[float, int]:
    """Samples/s of the last epoch (earlier ones warm caches)."""
    rate, n = 0.0, 0
    for _ in range(epochs):
        start, n = time.perf_counter(), 0
        for batch in make_iter():
            n += len(batch["labels"]) if isinstance(batch, dict) else len(batch[1])
        rate = n / (time.perf_counter() - start)
    return rate, n


def first_batch_seconds(url: str) -> float:
    start = time.perf_counter()
    next(iter(LatentLoader(LatentDataset(url, BATCH, seed=0))))
    return time.perf_counter() - start


def children_rss_mib() -> float:
    """Largest RSS among this process's children, in MiB."""
    pids = [p for task in Path("/proc/self/task").iterdir() for p in (task / "children").read_text().split()]
    largest = 0
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:  # the worker just exited
            continue
        largest = max([largest] + [int(line.split()[1]) for line in lines if line.startswith("VmRSS")])
    return largest / 1024


def worker_peak_rss(url: str) -> int:
    """Peak RSS of one spawned DataLoader worker reading an epoch, in MiB."""
    peak, done = [0.0], threading.Event()

    def poll() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], children_rss_mib())

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        for _ in LatentLoader(LatentDataset(url, BATCH, seed=0), num_workers=1, multiprocessing_context="spawn"):
            pass
    finally:
        done.set()
        poller.join()
    return round(peak[0])


def measure(name: str, url_ours: str, url_npy: str, n: int, epochs: int, common: dict) -> None:
    latency = first_batch_seconds(url_ours)
    print(json.dumps({**common, "source": name, "impl": "ours", "figure": "first_batch_s", "s": round(latency, 3)}))
    ours_loader = LatentLoader(LatentDataset(url_ours, BATCH, seed=0))
    ours, n_ours = time_epochs(lambda: ours_loader, epochs)
    baseline_loader = DataLoader(NpyFiles(url_npy, n), batch_size=BATCH, shuffle=True, num_workers=0)
    base, n_base = time_epochs(lambda: baseline_loader, epochs)
    for impl, rate, count in (("ours", ours, n_ours), ("npy_per_sample", base, n_base)):
        print(json.dumps({**common, "source": name, "impl": impl, "samples": count, "samples_per_s": round(rate)}))
    print(json.dumps({**common, "source": name, "figure": "ours_over_npy_per_sample", "ratio": round(ours / base, 2)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local-samples", type=int, default=20000)
    parser.add_argument("--s3-samples", type=int, default=3000)
    parser.add_argument("--cpu", type=int, default=0, help="CPU the reader is pinned to")
    parser.add_argument("--label", default="current", help="tag for every line (which reader version)")
    args = parser.parse_args()

    os.sched_setaffinity(0, {args.cpu})
    torch.set_num_threads(1)
    server_cpu = next(
        (c for c in sorted(os.sched_getaffinity(0) | set(range(os.cpu_count() or 1))) if c != args.cpu), None
    )
    common = {
        "benchmark": "latent_reader_256px",
        "cpu": platform.processor() or platform.machine(),
        "reader_cores": 1,
        "date": date.today().isoformat(),
        "batch": BATCH,
        "label": args.label,
    }
    with tempfile.TemporaryDirectory() as tmp:
        fmt = write_ours(f"{tmp}/ours", args.local_samples)
        print(
            json.dumps(
                {
                    **common,
                    "figure": "storage",
                    "raw_bytes_per_sample": LatentSpec(SHAPE).raw_sample_bytes,
                    **{k: round(v, 3) for k, v in fmt.items()},
                }
            )
        )
        rss = {"worker_peak_rss_mib": worker_peak_rss(f"{tmp}/ours")}
        print(json.dumps({**common, "source": "local_disk", "impl": "ours", "figure": "memory", **rss}))
        write_npy_files(f"{tmp}/npy", args.local_samples)
        measure("local_disk", f"{tmp}/ours", f"{tmp}/npy", args.local_samples, 2, common)

    proc, endpoint = start_moto_server(cpu=server_cpu)
    os.environ.update(s3_environment(endpoint))
    try:
        fs = fsspec.filesystem("s3")
        fs.mkdir("bench-bucket")
        write_ours("s3://bench-bucket/ours", args.s3_samples)
        write_npy_files("s3://bench-bucket/npy", args.s3_samples)
        measure("moto_s3", "s3://bench-bucket/ours", "s3://bench-bucket/npy", args.s3_samples, 1, common)
    finally:
        proc.terminate()


if __name__ == "__main__":
    main()
