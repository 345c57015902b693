"""Batch encoding through the autoencoder: preprocessed images -> stored latent arrays of both flips.

What an autoencoder stores (posterior mean + std, or a deterministic latent) and its shapes are
`latents.autoencoder`'s; this module batches, flips, samples (``--stored sample``) and casts.

One call encodes one micro-batch: B images and their B mirrors in one forward pass, in the order
[image 0..B-1, mirror 0..B-1]. Convolutions give results that depend (in the last float32 bits,
enough to change float16 roundings) on the batch they run in, so the job always encodes the same
micro-batches - fixed by the shard plan, never by how many workers there are or how Ray batches
rows - and shard bytes are reproducible.
"""

from __future__ import annotations

import numpy as np
import torch

from latents.autoencoder import Autoencoder, load_autoencoder
from latents.format import STORED_LATENT, STORED_POSTERIOR, STORED_SAMPLE, LatentSpec, key_hash
from pipeline.preprocess import to_model_input


def latent_spec(ae: Autoencoder, resolution: int, stored: str | None = None) -> LatentSpec:
    """The stored-sample spec for ``ae`` at ``resolution``; ``stored`` None: the autoencoder's own kind.

    Gaussian posteriors store "posterior" (mean + std, default) or "sample"; deterministic
    autoencoders store "latent" only. ValueError names what does not fit.
    """
    own = ae.stored_kind
    stored = stored or own
    if own == STORED_LATENT and stored != STORED_LATENT:
        raise ValueError(f"{ae.family.value} is deterministic: it stores the latent only, not {stored!r}")
    if own == STORED_POSTERIOR and stored not in (STORED_POSTERIOR, STORED_SAMPLE):
        raise ValueError(f"{ae.family.value} has a Gaussian posterior: store 'posterior' or 'sample', not {stored!r}")
    return LatentSpec(ae.latent_shape(resolution), stored=stored)


def sample_noise(keys: list[str], shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """(B, *shape) standard normal noise, a function of (seed, key) only."""
    out = []
    for key in keys:
        g = torch.Generator().manual_seed((key_hash(key) ^ seed) & (2**63 - 1))
        out.append(torch.randn(shape, generator=g))
    return torch.stack(out)


class VaeEncoder:
    """Holds an autoencoder on a device; turns uint8 crops into (B, F, K, C, h, w) float16 arrays."""

    def __init__(self, vae_name: str, dtype: torch.dtype, device: str, spec: LatentSpec, seed: int = 0):
        self.ae = load_autoencoder(vae_name, dtype=dtype, device=device)
        self.ae.module.to(memory_format=torch.channels_last)
        self.vae = self.ae.module
        self.dtype, self.device, self.spec, self.seed = dtype, torch.device(device), spec, seed

    @torch.inference_mode()
    def __call__(self, images: np.ndarray, keys: list[str]) -> np.ndarray:
        """images: (B, H, W, 3) uint8 crops -> (B, F, K, C, h, w) float16 (F flips, K = mean/std or sample)."""
        b = images.shape[0]
        x = torch.from_numpy(to_model_input(images)).to(self.device)  # (B, 3, H, W) in [-1, 1]
        if self.spec.flips:
            x = torch.cat([x, x.flip(-1)])  # (F*B, 3, H, W): images, then their mirrors
        x = x.to(self.dtype).contiguous(memory_format=torch.channels_last)
        mean, std = self.ae.encode(x)  # (F*B, C, h, w); std None for deterministic autoencoders
        mean = mean.float().reshape(self.spec.num_flips, b, *self.spec.latent_shape).transpose(0, 1)  # (B, F, C, h, w)
        if std is None:
            out = mean.unsqueeze(2)  # (B, F, 1, C, h, w): the latent
            return out.cpu().numpy().astype(self.spec.storage_dtype)
        std = std.float().reshape(self.spec.num_flips, b, *self.spec.latent_shape).transpose(0, 1)
        if self.spec.frame_shape[0] == 2:
            out = torch.stack([mean, std], dim=2)  # (B, F, 2, C, h, w)
        else:
            eps = sample_noise(keys, (self.spec.num_flips, *self.spec.latent_shape), self.seed).to(mean.device)
            out = (mean + std * eps).unsqueeze(2)  # (B, F, 1, C, h, w)
        return out.cpu().numpy().astype(self.spec.storage_dtype)
