"""Training metrics: the FLOP model behind MFU, loss by time bin, JSONL and TensorBoard writers.

FLOP model (DESIGN.md section 5; the DiT/SiT papers count multiply-accumulates as "FLOPs").
Per image, with T = (input_size / patch)^2 tokens of width D, depth L, p the patch side and
C the latent channels:

    blocks        L * (12 D^2 T + 2 T^2 D)      qkv 3, proj 1, mlp 8 (D^2 T); QK^T and AV (T^2 D)
    block adaLN   L * 6 D^2                     one (B, D) -> (B, 6D) linear per block
    embedders     T p^2 C D + 256 D + D^2       patch conv, timestep MLP
    final layer   T D p^2 C_out + 2 D^2         C_out = 2C with learn_sigma

SiT-XL/2 at 256 px comes to 118.6 GMAC per forward, the papers' figure. A training step costs
3 forward passes (forward + backward with two products per weight), i.e. 6 FLOPs per MAC per
image. MFU = achieved training FLOP/s / (peak FLOP/s per device * devices); the default peak
is the H100 dense bf16 datasheet figure, 989 TFLOP/s (a CPU run's MFU is meaningless).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from latents.artifacts import TRAIN_METRICS_FILE
from trainer.model import TIME_FREQUENCIES, SiTConfig

TRAIN_FLOPS_PER_MAC = 6  # 2 FLOPs per MAC, times 3 for forward + backward


def forward_macs(config: SiTConfig) -> float:
    """Multiply-accumulates of one forward pass for one image (see the module docstring)."""
    c = config
    d, p = c.hidden_size, c.patch_size
    tokens = (c.input_size // p) ** 2
    c_out = 2 * c.in_channels if c.learn_sigma else c.in_channels
    blocks = c.depth * (12 * d * d * tokens + 2 * tokens * tokens * d + 6 * d * d)
    embed = tokens * p * p * c.in_channels * d + TIME_FREQUENCIES * d + d * d
    final = tokens * d * p * p * c_out + 2 * d * d
    return float(blocks + embed + final)


def train_flops_per_image(config: SiTConfig) -> float:
    return TRAIN_FLOPS_PER_MAC * forward_macs(config)


def mfu(config: SiTConfig, images_per_second: float, devices: int, peak_tflops: float) -> float:
    """Model FLOP utilisation in [0, 1]."""
    return train_flops_per_image(config) * images_per_second / (devices * peak_tflops * 1e12)


def time_bin_sums(loss: torch.Tensor, t: torch.Tensor, bins: int) -> torch.Tensor:
    """(2 * bins,) float64 on the loss's device: the per-bin loss sums, then the per-bin counts, for t in [0, 1]."""
    index = (t.detach() * bins).long().clamp_(0, bins - 1)
    sums = torch.zeros(bins, dtype=torch.float64, device=loss.device).index_add_(0, index, loss.detach().double())
    counts = torch.bincount(index, minlength=bins).double()
    return torch.cat([sums, counts])


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak allocated accelerator memory, or None on CPU (not tracked there)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return None


class MetricsLog:
    """Rank 0's metrics: one JSON object per line in ``metrics.jsonl``, and TensorBoard scalars."""

    def __init__(self, run_dir: str, tensorboard: bool, wandb=None):
        self.wandb = wandb  # a trainer.wandb_log.WandbLog, or None
        self.path = Path(run_dir) / TRAIN_METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.path.open("a")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, step: int, values: dict) -> None:
        record = {"step": step, "time": round(time.time(), 3), **values}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and value is not None:
                    self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(step, values)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()
