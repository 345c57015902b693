"""The Stable Diffusion VAE: loading (offline only), dtype policy and the latent scaling.

`load_vae` takes a local directory saved with `save_pretrained` or a Hugging Face hub id that
is already in the local cache; nothing is downloaded at run time. The scaling factor always
comes from the VAE's own config (0.18215 for the SD VAEs).
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where used: the CLI imports this module for its choices
    import torch

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
VAE_CHOICES = ("stabilityai/sd-vae-ft-ema", "stabilityai/sd-vae-ft-mse")
VAE_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # torch dtype names; never fp16: it overflows on some images


class VaeNotFoundError(FileNotFoundError):
    """The VAE's weights are not available locally; the message says what to pass."""


def vae_dtype(name: str) -> torch.dtype:
    import torch

    if name not in VAE_DTYPES:
        raise ValueError(f"unknown VAE dtype {name!r}; valid: {', '.join(VAE_DTYPES)} (fp16 overflows, never used)")
    return getattr(torch, VAE_DTYPES[name])


def load_vae(name_or_path: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """An `AutoencoderKL` in eval mode (float32 unless ``dtype``), from a local directory or a cached hub id."""
    import torch
    from diffusers import AutoencoderKL

    dtype = dtype or torch.float32

    local = os.path.isdir(name_or_path)
    try:
        with warnings.catch_warnings():  # diffusers passes huggingface-hub 2.x a deprecated argument
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks")
            vae = AutoencoderKL.from_pretrained(
                name_or_path, local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=False
            )
    except (OSError, ValueError) as err:
        if local:
            where = "the directory"
        elif name_or_path.startswith(("/", ".", "~")):
            where = "that path (no such directory)"
        else:
            where = "the local Hugging Face cache"
        raise VaeNotFoundError(
            f"VAE {name_or_path!r}: no weights in {where} ({type(err).__name__}). Nothing is downloaded at run "
            f"time: pass --vae a directory saved with AutoencoderKL.save_pretrained (e.g. after "
            f"`hf download {DEFAULT_VAE} --local-dir sd-vae-ft-ema` on a machine with network), "
            f"or pre-fill the hub cache (HF_HOME)."
        ) from None
    return vae.to(device=device).eval()  # already in ``dtype`` (casting again makes diffusers warn)


def scaling_factor(vae) -> float:
    """The latent scaling factor from the VAE's config (one source for it)."""
    return float(vae.config.scaling_factor)
