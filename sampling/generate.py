"""Samples -> latents -> images for a list of sample indices: the work of one worker.

Used by the Ray job's actors (`sampling.job`) and by `sit sample --grid`, so both produce the
same pixels for the same (seed, i). The model and the VAE are loaded once per process
(`Generator`); each call samples ``batch_size`` samples at a time, checks the latents are finite
and decodes them.

Batch invariance (CPU, checked by the tests): a sample's bits do not depend on the batch it ran
in. Model forwards are padded to a minimum row count (`sampling.options.MIN_FORWARD_ROWS`); the
VAE decodes one sample at a time, because its convolutions pick different kernels for different
batch sizes (a last-bit difference that flips a few uint8 pixels). The decoder is a small share
of the cost (one decode against ~250-500 transformer forwards per sample). On GPUs, cuBLAS also
chooses kernels by shape: there, bits are the same across worker counts and restarts for one
``--batch-size``; another batch size may change the last bit of a few pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from latents.autoencoder import load_autoencoder, vae_dtype
from sampling.checkpoint import check_fits_autoencoder, decode_transform, load_checkpoint
from sampling.options import SamplerOptions, SamplingUsageError, run_sampler
from sampling.plan import ClassPolicy, SamplePlan


class NonFiniteSamplesError(ArithmeticError):
    """Sampling produced NaN or Inf; the message names the samples (and the chunk, in a job)."""


@dataclass
class Generated:
    """Outputs for a list of samples, in the order asked."""

    images: np.ndarray  # uint8 (n, H, W, 3)
    labels: np.ndarray  # int64 (n,)
    latents: np.ndarray  # float32 (n, C, h, w) in model space (the transform the export records)
    nfe: int  # model calls per batch, summed over batches


@dataclass(frozen=True)
class ModelSource:
    """Where the model and the VAE come from, and how to run them (picklable: sent to Ray actors)."""

    checkpoint: str  # fsspec URL of an export or a released .pt
    vae: str  # autoencoder directory or cached hub id; must be the one the export records
    vae_dtype: str = "fp32"  # fp32 | bf16 for decoding
    allow_vae_mismatch: bool = False  # decode with another autoencoder than the export records
    model_name: str | None = None  # preset of a released .pt
    num_heads: int | None = None  # heads of a released .pt without a preset
    image_size: int | None = None  # checked against the model; None: the model's own


class Generator:
    """A model and an autoencoder loaded once, on one device; decoding uses the export's transform."""

    def __init__(self, source: ModelSource, device: str = "cpu"):
        self.device = torch.device(device)
        self.model, self.checkpoint_sha256, extra = load_checkpoint(
            source.checkpoint, source.model_name, source.num_heads
        )
        self.training_transport = extra.get("transport") if extra else None
        self.autoencoder = load_autoencoder(source.vae, vae_dtype(source.vae_dtype), self.device)
        self.transform = decode_transform(extra, self.autoencoder, source.checkpoint, source.allow_vae_mismatch)
        self.image_size = check_fits_autoencoder(
            self.model, self.autoencoder, self.transform, source.image_size, source.checkpoint
        )
        self.model.to(self.device)
        c = self.model.config
        self.latent_shape = (c.in_channels, c.input_size, c.input_size)

    def resolve(self, options: SamplerOptions) -> SamplerOptions:
        """``options`` with the transport the checkpoint was trained with where the user set none."""
        return options.with_training_transport(self.training_transport)

    def generate(
        self, options: SamplerOptions, plan: SamplePlan, indices: list[int] | range, batch_size: int
    ) -> Generated:
        """Sample, check and decode the given samples, ``batch_size`` at a time."""
        options = self.resolve(options)
        if batch_size < 1:
            raise SamplingUsageError(f"--batch-size must be >= 1, got {batch_size}")
        if options.cfg_scale > 1 and self.model.y_embedder.embedding_table.num_embeddings <= plan.num_classes:
            raise SamplingUsageError("--cfg-scale > 1 needs a null class, and this checkpoint was trained without one")
        indices = list(indices)
        images, labels, latents, nfe = [], [], [], 0
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            noise, y, generators = plan.start(batch, self.latent_shape, self.device)
            out = run_sampler(self.model, options, noise, y, generators)
            bad = ~torch.isfinite(out.x).flatten(1).all(dim=1)
            if bool(bad.any()):
                which = [batch[j] for j in bad.nonzero().flatten().tolist()]
                raise NonFiniteSamplesError(f"NaN/Inf latents in samples {which[:10]} ({len(which)} of {len(batch)})")
            ae, transform = self.autoencoder, self.transform
            images.extend(ae.decode_to_uint8(out.x[j : j + 1], transform) for j in range(len(batch)))
            labels.append(y.cpu().numpy())
            latents.append(out.x.float().cpu().numpy())
            nfe += out.nfe
        return Generated(np.concatenate(images), np.concatenate(labels), np.concatenate(latents), nfe)


def sample_grid(
    source: ModelSource,
    options: SamplerOptions,
    classes: tuple[int, ...],
    per_class: int,
    seed: int,
    batch_size: int = 16,
    device: str = "cpu",
):
    """A labelled PIL grid: one row per class, ``per_class`` samples each (no Ray, one process).

    Row r holds samples r * per_class ... of a "list" plan, so a grid image equals the bulk job's
    image for the same seed, index and class list.
    """
    from latents.pictures import image_grid

    gen = Generator(source, device)
    labels = tuple(c for c in classes for _ in range(per_class))
    plan = SamplePlan(seed, len(labels), gen.model.config.num_classes, ClassPolicy.LIST, labels)
    out = gen.generate(options, plan, range(len(labels)), batch_size)
    return image_grid(out.images, per_class, [f"class {c}" for c in classes])
