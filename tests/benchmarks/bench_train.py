"""Trainer overhead on CPU: the step of `sit train` (world size 1) vs a plain PyTorch loop's.

Both train the same model (SiT, depth 4, hidden 256, 4 heads, patch 2 on 4x16x16 latents, 64
tokens), batch 16, the Linear velocity loss with label dropout, AdamW (lr 1e-4) and an EMA
update every step, in float32 with one torch thread. The plain step is the released SiT
train.py reduced to its arithmetic: an in-memory batch, an unwrapped module. Ours is the body of
`trainer.train`'s loop: the next batch from the streaming reader (no DataLoader workers, so its
decoding counts in our time), then `Trainer.train_step` - FSDP2 at world size 1, time/noise/label
generators, the statistics all-reduce, the gradient norm, AdamW, the EMA update. (Per-window
logging and checkpoints are left out of both.)

The machine these run on is shared, so the two alternate step by step in one process (load
drifts hit both alike) and the medians of the per-step times after a warm-up are compared.
Prints one JSON line per figure.

    python -m tests.benchmarks.bench_train [--steps 60]

Like bench_encode.py, ``--device cuda``, ``--precision bf16`` (the trainer's policy; autocast in
the plain loop) and ``--compile`` (torch.compile per block: `parallel.compile`, and the same in
the plain loop) apply to both loops. ``--throughput PRESET`` instead times only the trainer's
step (`Trainer.train_step` on one in-memory batch, so the reader is not what is measured: see
bench_reader.py) for a `sit train` preset's model, e.g. sit-b2-256 or sit-xl2-256-modern, and
prints its images/s and MFU (against ``--peak-tflops``, the H100 dense bf16 datasheet figure by
default). tests/benchmarks/gpu_suite.sh runs those on one GPU. ``--breakdown`` times each part of a
step alone (next batch, forward, backward, optimizer, EMA), ours vs the plain loop
alternated, and prints the medians in ms: where the overhead goes.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from datetime import date

import numpy as np
import torch

from latents.format import LatentSpec
from latents.writer import DatasetWriter
from trainer.config import apply, preset
from trainer.metrics import mfu
from trainer.model import SiT
from trainer.parallelize import close_world, init_world
from trainer.train import Trainer
from trainer.transport import Transport

MODEL = {"name": "custom", "depth": 4, "hidden_size": 256, "num_heads": 4, "patch_size": 2, "input_size": 16}
SHAPE = (4, 16, 16)
BATCH = 16
WARMUP = 10  # untimed steps of each loop first
SEED = 0


def write_data(url: str, n: int, shape: tuple[int, ...] = SHAPE, classes: int = 10) -> None:
    rng = np.random.default_rng(0)
    with DatasetWriter(
        url, LatentSpec(shape), resolution=shape[-1] * 8, vae="synthetic", scaling_factor=1.0, num_classes=classes
    ) as w:
        for i in range(n):
            mean = rng.standard_normal(shape).astype(np.float32)
            frame = np.stack([mean, np.full(shape, 0.05, np.float32)])
            w.add(f"s/{i:06d}", int(rng.integers(classes)), np.stack([frame, frame[..., ::-1]]).astype(np.float16))


def bench_config(args: argparse.Namespace, run_dir: str, data: str, batch: int):
    """The tiny-cpu preset with the benchmark's model (or ``--throughput``'s preset) and flags."""
    config = preset(args.throughput or "tiny-cpu")
    apply(
        config,
        {
            "run_dir": run_dir,
            "seed": SEED,
            "data": {"url": data, "global_batch_size": batch, "num_workers": 0},
            "optim": {"lr": 1e-4, "ema_decay": 0.9999},
            "parallel": {"precision": args.precision, "compile": args.compile},
        },
    )
    if not args.throughput:
        apply(config, {"model": MODEL})
    return config.validate()


class Ours:
    """The trainer's loop body: next batch, then `Trainer.train_step`."""

    def __init__(self, config, device: str, in_memory: bool = False):
        self.trainer = Trainer(config, init_world("gloo" if device == "cpu" else "nccl"))
        self.batches = iter(())
        self.fixed = next(iter(self.trainer.loader)) if in_memory else None

    def next_batch(self) -> dict:
        batch = next(self.batches, None)
        if batch is None:  # the next epoch
            self.batches = iter(self.trainer.loader)
            batch = next(self.batches)
        return batch

    def step(self) -> None:
        batch = self.next_batch() if self.fixed is None else self.fixed
        self.trainer.train_step(batch, stop_requested=False)


class Plain:
    """The released loop's arithmetic: forward, loss, backward, AdamW, EMA, on an in-memory batch."""

    def __init__(self, config, device: str = "cpu", precision: str = "fp32", compile: bool = False):
        torch.manual_seed(SEED)
        self.model = SiT(config.model.sit_config()).to(device).train()
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        if compile:
            for block in self.model.blocks:
                block.compile()
        cuda = device == "cuda"
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=1e-4, weight_decay=0, foreach=not cuda, fused=cuda or None
        )
        self.transport = Transport()
        self.gen = torch.Generator(device).manual_seed(1)
        self.label_gen = torch.Generator(device).manual_seed(2)
        shape = (config.model.in_channels, config.model.input_size, config.model.input_size)
        batch = config.data.global_batch_size
        self.batch = (torch.randn(batch, *shape, device=device), torch.randint(0, 10, (batch,), device=device))
        self.ema_params, self.params = list(self.ema.parameters()), list(self.model.parameters())
        self.autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(self) -> None:
        x, y = self.batch
        with self.autocast:
            terms = self.transport.training_losses(self.model, x, self.gen, y=y, label_generator=self.label_gen)
        self.opt.zero_grad(set_to_none=True)
        terms["loss"].mean().backward()
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, self.params, 1 - 0.9999)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def throughput(args: argparse.Namespace, common: dict) -> None:
    """Images/s and MFU of the trainer's step for a preset's model, on one in-memory batch."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = preset(args.throughput)
        shape = (probe.model.in_channels, probe.model.input_size, probe.model.input_size)
        data = f"{tmp}/ds"
        write_data(data, args.batch, shape, probe.model.num_classes)
        config = bench_config(args, f"{tmp}/run", data, args.batch)
        ours = Ours(config, args.device, in_memory=True)
        times = []
        for i in range(WARMUP + args.steps):
            sync(args.device)
            start = time.perf_counter()
            ours.step()
            sync(args.device)
            if i >= WARMUP:
                times.append(time.perf_counter() - start)
        model_config = ours.trainer.model_config
        close_world()
    ips = args.batch / statistics.median(times)
    flags = {"preset": args.throughput, "batch": args.batch, "steps": args.steps, **common}
    print(json.dumps({"figure": "train_images_per_s", "value": round(ips, 2), **flags}))
    value = mfu(model_config, ips, 1, args.peak_tflops)
    print(json.dumps({"figure": "train_mfu", "value": round(value, 4), "peak_tflops": args.peak_tflops, **flags}))


def breakdown(args: argparse.Namespace, config, common: dict) -> None:
    """Each part of a step timed alone, ours and the plain loop's alternated (medians, ms): where
    the overhead goes. Ours' parts are `Trainer.train_step`'s, called one by one on FSDP2's
    model, then a whole step of each; the parts timed alone need not add up to the step."""
    ours, plain = Ours(config, args.device), Plain(config, args.device, args.precision, args.compile)
    trainer = ours.trainer
    batch = ours.next_batch()
    x, y = batch["latents"], batch["labels"]

    def ema_plain() -> None:
        with torch.no_grad():
            torch._foreach_lerp_(plain.ema_params, plain.params, 1 - 0.9999)

    def steps(model, opt, ema, gen, label_gen, x, y) -> dict:
        terms = {}
        return {
            "forward": lambda: terms.update(transport.training_losses(model, x, gen, y=y, label_generator=label_gen)),
            "backward": lambda: terms.pop("loss").mean().backward(),
            "optimizer": opt.step,
            "ema": ema,
            "zero_grad": lambda: opt.zero_grad(set_to_none=True),
        }

    transport = trainer.transport
    loops = {
        "sit_train": steps(
            trainer.model,
            trainer.optimizer,
            lambda: trainer.ema.update(trainer.model),
            trainer.noise_gen,
            trainer.label_gen,
            x,
            y,
        ),
        "plain_loop": steps(plain.model, plain.opt, ema_plain, plain.gen, plain.label_gen, *plain.batch),
    }
    loops["sit_train"]["next_batch"] = ours.next_batch
    whole = {"sit_train": lambda: trainer.train_step(batch, stop_requested=False), "plain_loop": plain.step}
    times: dict[tuple[str, str], list[float]] = {}
    for i in range(WARMUP + args.steps):
        for name, parts in loops.items():
            for part, fn in [*parts.items(), ("step", whole[name])]:
                sync(args.device)
                start = time.perf_counter()
                fn()
                sync(args.device)
                if i >= WARMUP:
                    times.setdefault((name, part), []).append(time.perf_counter() - start)
    close_world()
    ms = {key: statistics.median(v) * 1000 for key, v in times.items()}
    for part in ["next_batch", *loops["plain_loop"], "step"]:
        values = {name: round(ms.get((name, part), 0.0), 2) for name in loops}
        print(json.dumps({"figure": "step_part_ms", "part": part, **values, "steps": args.steps, **common}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps of each (after a warm-up of 10)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (parallel.compile)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--throughput", metavar="PRESET", help="time only the trainer's step for this preset")
    parser.add_argument("--batch", type=int, default=BATCH, help="batch of --throughput (default: %(default)s)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="per-device peak for the MFU")
    parser.add_argument("--breakdown", action="store_true", help="time each part of a step alone, ours vs plain")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    common = {
        "date": str(date.today()),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "precision": args.precision,
        "compile": args.compile,
    }
    if args.throughput:
        throughput(args, common)
        return
    times: dict[str, list[float]] = {"sit_train": [], "plain_loop": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/ds"
        write_data(data, BATCH * 24)
        config = bench_config(args, f"{tmp}/run", data, BATCH)
        if args.breakdown:
            breakdown(args, config, common)
            return
        loops = {
            "sit_train": Ours(config, args.device),
            "plain_loop": Plain(config, args.device, args.precision, args.compile),
        }
        for i in range(WARMUP + args.steps):
            for name, loop in loops.items():
                sync(args.device)
                start = time.perf_counter()
                loop.step()
                sync(args.device)
                if i >= WARMUP:
                    times[name].append(time.perf_counter() - start)
        close_world()
    medians = {k: statistics.median(v) for k, v in times.items()}
    for name, median in medians.items():
        print(
            json.dumps(
                {
                    "figure": f"steps_per_s_{name}",
                    "value": round(1 / median, 3),
                    "batch": BATCH,
                    "steps": args.steps,
                    **common,
                }
            )
        )
    ratio = medians["sit_train"] / medians["plain_loop"]
    print(json.dumps({"figure": "overhead_ratio", "value": round(ratio, 3), "target": 1.15, **common}))


if __name__ == "__main__":
    main()
