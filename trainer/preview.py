"""EMA preview grids during training, decoded through `latents.autoencoder`.

Every rank runs the same probability-flow ODE (Euler, ``log.sample_steps`` uniform steps over the
transport's interval, fixed noise) with the sharded EMA - its forward is collective - and rank 0
writes one PNG: a row per class of ``log.sample_classes``, decoded with the autoencoder of
``log.vae`` (loaded once, on the first preview, and checked against the dataset card's
autoencoder) and the transform the model trains in, else the
latent-channel picture of `latents.pictures.latent_picture`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from latents.autoencoder import check_identity, load_autoencoder
from latents.pictures import image_grid, latent_picture

if TYPE_CHECKING:
    from trainer.train import Trainer

PREVIEW_SEED = 1234  # fixed noise: grids of different steps are comparable


@torch.no_grad()
def euler_ode(model_fn, transport, x: torch.Tensor, num_steps: int) -> torch.Tensor:
    """dx/dt = v(x, t) from noise (t0) to data (t1) in ``num_steps`` Euler steps (NFE = num_steps)."""
    t0, t1 = transport.ode_interval()
    ts = torch.linspace(t0, t1, num_steps + 1, dtype=torch.float64)
    for a, b in zip(ts[:-1].tolist(), ts[1:].tolist(), strict=True):
        t = torch.full((x.shape[0],), a, dtype=x.dtype, device=x.device)
        x = x + (b - a) * transport.velocity(model_fn(x, t), x, t)
    return x


def preview_autoencoder(trainer: Trainer):
    """``log.vae``, checked against the dataset's autoencoder, loaded on first use and then kept."""
    if trainer.preview_autoencoder is None:
        c = trainer.config
        ae = load_autoencoder(c.log.vae, torch.float32, trainer.world.device)
        check_identity(trainer.dataset.card.autoencoder, ae, f"the dataset {c.data.url}", "log.vae")
        trainer.preview_autoencoder = ae
    return trainer.preview_autoencoder


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
    x = euler_ode(lambda x, t: ema(x, t, y), trainer.transport, z, c.log.sample_steps)
    if not trainer.world.is_main:
        return
    pictures = preview_autoencoder(trainer).decode_to_uint8(x, trainer.transform) if c.log.vae else latent_picture(x)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(pictures, per, [f"class {k}" for k in classes]).save(path)
