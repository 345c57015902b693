"""Builders for trainer tests: a learnable toy latent dataset and a tiny training config."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from latents.format import LatentSpec
from latents.writer import DatasetWriter
from trainer.config import TrainConfig, apply, preset

SHAPE = (4, 8, 8)
NUM_CLASSES = 10
DATA_STD = 0.5  # spread of each class around its mean pattern


def class_means(num_classes: int = NUM_CLASSES, shape=SHAPE, seed: int = 123) -> np.ndarray:
    """(K, C, H, W) fixed means, one per class: a level per channel, ~ N(0, 1.5^2), the same at every position."""
    levels = 1.5 * np.random.default_rng(seed).standard_normal((num_classes, shape[0], 1, 1))
    return np.broadcast_to(levels, (num_classes, *shape)).astype(np.float32)


def write_toy_dataset(url: str, n: int = 64, num_classes: int = NUM_CLASSES, shape=SHAPE, seed: int = 0, **kw) -> str:
    """Class-dependent Gaussians: x = mean[label] + DATA_STD * N(0, I), stored as posterior means
    (with a small posterior std) without mirrors; scaling factor 1."""
    rng = np.random.default_rng(seed)
    means = class_means(num_classes, shape)
    spec = LatentSpec(shape, flips=False)
    with DatasetWriter(
        url,
        spec,
        resolution=shape[-1] * 8,
        vae="test/none",
        scaling_factor=1.0,
        num_classes=num_classes,
        samples_per_shard=kw.pop("samples_per_shard", 16),
        source_fingerprint="toy-gaussians",
    ) as writer:
        for i in range(n):
            label = int(rng.integers(num_classes))
            x = means[label] + DATA_STD * rng.standard_normal(shape).astype(np.float32)
            std = np.full(shape, 0.01, dtype=np.float32)
            writer.add(f"toy/{i:05d}", label, np.stack([x, std])[None].astype(np.float16))
    return url


def tiny_config(data_url: str, run_dir: str, **values) -> TrainConfig:
    """The tiny-cpu preset on ``data_url`` in ``run_dir``, fp32, no TensorBoard, plus nested overrides."""
    config = preset("tiny-cpu")
    apply(config, {"run_dir": run_dir, "data": {"url": data_url}, "log": {"tensorboard": False, "progress": False}})
    apply(config, values)
    return config.validate()


ROOT = Path(__file__).resolve().parents[2]


def train_command(nproc: int, data_url: str, run_dir: str, *overrides: str) -> list[str]:
    """`python -m trainer.train` (nproc 1) or the same under torchrun with gloo on CPU."""
    flags = ["--preset", "tiny-cpu", "--data", data_url, "--run-dir", run_dir]
    flags += ["--set", "log.tensorboard=false", "--set", "log.progress=false"]
    for o in overrides:
        flags += ["--set", o]
    if nproc == 1:
        return [sys.executable, "-m", "trainer.train", *flags]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "trainer.train",
        *flags,
    ]


def launch(command: list[str]) -> subprocess.Popen:
    """Start a training process in its own session (so a test can signal the whole group)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        command, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def run(command: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    proc = launch(command)
    out, _ = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(command, proc.returncode, out)


def last_step(run_dir: str) -> int:
    """The newest step logged in metrics.jsonl (0 if none yet)."""
    path = Path(run_dir) / "metrics.jsonl"
    step = 0
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError, KeyError):  # a line being written
                step = max(step, json.loads(line)["step"])
    return step


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def interrupt_at(command: list[str], run_dir: str, step: int, sig: int, timeout: float = 240) -> tuple[int, str, int]:
    """Start ``command``, send ``sig`` to its process group once ``step`` is logged; (rc, output, step seen)."""
    proc = launch(command)
    deadline = time.monotonic() + timeout
    seen = 0
    while proc.poll() is None and time.monotonic() < deadline:
        seen = last_step(run_dir)
        if seen >= step:
            if sig == signal.SIGKILL:  # the whole job at once, as when a machine is lost
                for pid in [proc.pid, *descendants(proc.pid)]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
            else:
                proc.send_signal(sig)
            break
        time.sleep(0.005)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out, seen


def consolidated(folder: str, tmp_path: Path) -> dict:
    """Every tensor of a (sharded) DCP checkpoint as one flat dict, plus each rank's local state."""
    out = tmp_path / f"{Path(folder).name}-{random.random()}.pt"
    dcp_to_torch_save(folder, out)
    state = torch.load(out, weights_only=False)
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        else:
            flat[prefix] = value

    walk("", state)
    for rank_file in sorted(Path(folder).glob("rank-*.pt")):
        walk(rank_file.name, torch.load(rank_file, weights_only=True))
    return flat


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert any(k.startswith(".ema.") for k in a) and any(k.startswith(".optim.state") for k in a)
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), f"{key} differs"
        else:
            assert x == y, f"{key}: {x!r} != {y!r}"
