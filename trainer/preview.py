"""EMA preview grids during training, drawn through `sampling/`.

Every rank runs the same probability-flow ODE (Euler, ``log.sample_steps`` steps, fixed noise)
with the sharded EMA - its forward is collective - and rank 0 writes one PNG: a row per class of
``log.sample_classes``, decoded by the VAE of ``log.vae`` when one is given, else the
latent-channel picture of `sampling.grid.latent_picture`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sampling.grid import decode_to_uint8, image_grid, latent_picture
from sampling.ode import sample_ode

if TYPE_CHECKING:
    from trainer.train import Trainer

PREVIEW_SEED = 1234  # fixed noise: grids of different steps are comparable


def draw_preview(trainer: Trainer, path: Path) -> None:
    """Sample with the EMA on every rank; rank 0 saves the grid PNG at ``path``."""
    c, mc = trainer.config, trainer.model_config
    classes = c.log.preview_classes(mc.num_classes)
    per = c.log.sample_per_class
    dev = trainer.world.device
    y = torch.tensor(classes, device=dev).repeat_interleave(per)
    generator = torch.Generator().manual_seed(PREVIEW_SEED)
    z = torch.randn(len(y), mc.in_channels, mc.input_size, mc.input_size, generator=generator).to(dev)
    ema = trainer.ema
    result = sample_ode(lambda x, t: ema(x, t, y), trainer.transport, z, method="euler", num_steps=c.log.sample_steps)
    if not trainer.world.is_main:
        return
    if c.log.vae:
        from pipeline.vae import load_vae

        vae = load_vae(c.log.vae, torch.float32, dev)
        pictures = decode_to_uint8(vae, result.x, trainer.dataset.card.scaling_factor)
    else:
        pictures = latent_picture(result.x)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(pictures, per, [f"class {k}" for k in classes]).save(path)
