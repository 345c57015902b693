"""The demo's data: coloured shapes a person tells apart at a glance, and a small VAE fitted to them.

The Stable Diffusion VAE cannot be downloaded where the demo runs, so the demo trains a small
`diffusers.AutoencoderKL` on its own images first (a few hundred steps of L1 reconstruction plus a
small KL term, as the SD VAE was trained) and saves it with `save_pretrained`. From then on the
pipeline loads and uses it exactly as it loads the SD VAE; like the SD VAE's 0.18215, its
`scaling_factor` is set so that scaled latents have unit standard deviation.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from pipeline.synthetic import SyntheticImage, write_imagefolder

# One class per (colour, shape); names are the class folders (sorted order = label order).
CLASSES = (
    ("red", "circle"),
    ("green", "square"),
    ("blue", "triangle"),
    ("orange", "cross"),
    ("purple", "diamond"),
    ("black", "ring"),
)
COLORS = {
    "red": (215, 35, 35),
    "green": (30, 160, 60),
    "blue": (35, 75, 215),
    "orange": (245, 140, 20),
    "purple": (140, 50, 170),
    "black": (25, 25, 25),
}
BROKEN_FILES = {"empty": b"", "not-an-image": b"this is not an image\n"}


def class_names() -> list[str]:
    return [f"{i}-{color}-{shape}" for i, (color, shape) in enumerate(CLASSES)]


def draw_shape(color: str, shape: str, rng: np.random.Generator, size: int) -> Image.Image:
    """One ``size`` x ``size`` picture: a jittered shape of a jittered colour on a light background."""
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(205, 256, 3)))
    draw = ImageDraw.Draw(image)
    r = rng.uniform(0.24, 0.36) * size
    cx, cy = rng.uniform(r + 1, size - r - 1, 2)
    fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLORS[color])
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "cross":
        w = r / 2.6
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, round(r / 3)))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image


def shape_images(per_class: int, size: int = 64, seed: int = 0) -> list[SyntheticImage]:
    """``per_class`` JPEGs per class in the ILSVRC layout, then one broken file of each kind."""
    rng = np.random.default_rng(seed)
    images = []
    for label, (name, (color, shape)) in enumerate(zip(class_names(), CLASSES, strict=True)):
        for i in range(per_class):
            buf = io.BytesIO()
            draw_shape(color, shape, rng, size).save(buf, format="JPEG", quality=95)
            images.append(SyntheticImage(name, label, f"{name}_{i:05d}.JPEG", buf.getvalue()))
    for b, (reason, data) in enumerate(BROKEN_FILES.items()):
        name = class_names()[b]
        images.append(SyntheticImage(name, b, f"{name}_broken{b}.JPEG", data, reason))
    return images


def write_shapes(url: str, per_class: int, size: int = 64, seed: int = 0) -> list[SyntheticImage]:
    images = shape_images(per_class, size, seed)
    write_imagefolder(url, images)
    return images


def images_tensor(images: list[SyntheticImage], resolution: int) -> torch.Tensor:
    """(N, 3, R, R) in [-1, 1] of the good images, resized as the encode job crops them."""
    from pipeline.preprocess import preprocess, to_model_input

    arrays = np.stack([preprocess(im.data, resolution) for im in images if not im.broken])
    return torch.from_numpy(to_model_input(arrays))


def fit_vae(
    images: torch.Tensor,
    out_dir: str | Path,
    steps: int = 300,
    batch_size: int = 32,
    seed: int = 0,
    log=print,
) -> Path:
    """Train a small AutoencoderKL (x4 downsampling, 4 latent channels) on ``images``; save it."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=images.shape[-1],
    )
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        x = images[torch.randint(0, len(images), (batch_size,), generator=g)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        loss = (recon - x).abs().mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps:
            log(f"  vae step {step}/{steps}: L1 {loss.item():.4f} ({time.perf_counter() - start:.0f}s)")
    with torch.no_grad():
        std = torch.cat([vae.encode(b).latent_dist.mean for b in images[:512].split(64)]).std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    vae.save_pretrained(out_dir)
    return Path(out_dir)
