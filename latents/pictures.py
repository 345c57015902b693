"""Pictures of latents and samples: a viewable stand-in for latents, labelled grids.

Decoding to image bytes is `latents.autoencoder.Autoencoder.decode_to_uint8` (the one place latents
become pixels: the bulk sampler, `sit sample --grid` and the trainer's previews all go through it).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

Tensor = torch.Tensor

LABEL_WIDTH = 80  # pixels left of each row for its label


def latent_picture(latents: Tensor) -> np.ndarray:
    """A viewable picture of latents when no VAE is at hand: (N, C, H, W) -> uint8 (N, H, W, 3).

    The first 3 channels (the only one, repeated, if C == 1) are each mapped to [0, 255] by their
    own min and max over the whole batch, so pictures of one batch are comparable.
    """
    x = latents.detach().float().cpu()
    x = x[:, :3] if x.shape[1] >= 3 else x[:, :1].expand(-1, 3, -1, -1)
    lo = x.amin(dim=(0, 2, 3), keepdim=True)
    hi = x.amax(dim=(0, 2, 3), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-12)
    return (x * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def image_grid(images: np.ndarray, nrow: int, row_labels: list[str] | None = None) -> Image.Image:
    """Tile uint8 images (N, H, W, 3) into rows of ``nrow`` images, one label per row.

    With ``row_labels`` a white margin on the left of each row holds its label (PIL's default
    font); the number of labels must equal the number of rows.
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    n, h, w, _ = images.shape
    rows = -(-n // nrow)
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row labels for {rows} rows")
    font = ImageFont.load_default()
    margin = 0
    if row_labels is not None:  # at least LABEL_WIDTH, wider for long labels
        measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        margin = max(LABEL_WIDTH, *(int(measure.textlength(label, font=font)) + 12 for label in row_labels))
    grid = Image.new("RGB", (margin + nrow * w, rows * h), "white")
    for i in range(n):
        r, c = divmod(i, nrow)
        grid.paste(Image.fromarray(images[i]), (margin + c * w, r * h))
    if row_labels is not None:
        draw = ImageDraw.Draw(grid)
        for r, label in enumerate(row_labels):
            draw.text((4, r * h + max(h // 2 - 6, 0)), label, fill="black", font=font)
    return grid
