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
from trainer.model import SiT
from trainer.parallelize import close_world, init_world
from trainer.train import Trainer
from trainer.transport import Transport

MODEL = {"name": "custom", "depth": 4, "hidden_size": 256, "num_heads": 4, "patch_size": 2, "input_size": 16}
SHAPE = (4, 16, 16)
BATCH = 16
WARMUP = 10  # untimed steps of each loop first
SEED = 0


def write_data(url: str, n: int) -> None:
    rng = np.random.default_rng(0)
    with DatasetWriter(
        url, LatentSpec(SHAPE), resolution=128, vae="synthetic", scaling_factor=1.0, num_classes=10
    ) as w:
        for i in range(n):
            mean = rng.standard_normal(SHAPE).astype(np.float32)
            frame = np.stack([mean, np.full(SHAPE, 0.05, np.float32)])
            w.add(f"s/{i:06d}", int(rng.integers(10)), np.stack([frame, frame[..., ::-1]]).astype(np.float16))


class Ours:
    """The trainer's loop body: next batch, then `Trainer.train_step`."""

    def __init__(self, data: str, run_dir: str):
        config = preset("tiny-cpu")
        apply(
            config,
            {
                "run_dir": run_dir,
                "seed": SEED,
                "model": MODEL,
                "data": {"url": data, "global_batch_size": BATCH, "num_workers": 0},
                "optim": {"lr": 1e-4, "ema_decay": 0.9999},
            },
        )
        self.trainer = Trainer(config.validate(), init_world("gloo"))
        self.batches = iter(())

    def step(self) -> None:
        batch = next(self.batches, None)
        if batch is None:  # the next epoch
            self.batches = iter(self.trainer.loader)
            batch = next(self.batches)
        self.trainer.train_step(batch, stop_requested=False)


class Plain:
    """The released loop's arithmetic: forward, loss, backward, AdamW, EMA, on an in-memory batch."""

    def __init__(self):
        config = preset("tiny-cpu")
        apply(config, {"model": MODEL})
        torch.manual_seed(SEED)
        self.model = SiT(config.model.sit_config()).train()
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0, foreach=True)
        self.transport = Transport()
        self.gen, self.label_gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
        self.batch = (torch.randn(BATCH, *SHAPE), torch.randint(0, 10, (BATCH,)))
        self.ema_params, self.params = list(self.ema.parameters()), list(self.model.parameters())

    def step(self) -> None:
        x, y = self.batch
        terms = self.transport.training_losses(self.model, x, self.gen, y=y, label_generator=self.label_gen)
        self.opt.zero_grad(set_to_none=True)
        terms["loss"].mean().backward()
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, self.params, 1 - 0.9999)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps of each (after a warm-up of 10)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    common = {"date": str(date.today()), "machine": platform.machine(), "torch": torch.__version__, "threads": 1}
    times: dict[str, list[float]] = {"sit_train": [], "plain_loop": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/ds"
        write_data(data, BATCH * 24)
        loops = {"sit_train": Ours(data, f"{tmp}/run"), "plain_loop": Plain()}
        for i in range(WARMUP + args.steps):
            for name, loop in loops.items():
                start = time.perf_counter()
                loop.step()
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
