"""Image preprocessing for encoding: decode, any mode to RGB, ADM center crop, scaling to [-1, 1].

The crop is the released ADM/DiT/SiT `center_crop_arr` (DESIGN.md §2): while the short side is at
least twice the target, halve the image with a BOX filter; then scale the short side to the
target with BICUBIC; then take the center square. Images smaller than the target are upscaled by
the same BICUBIC step, as in the released code, never rejected.

Reduced-size decoding (``draft=True``): a JPEG can be decoded directly at 1/2, 1/4 or 1/8 scale
(libjpeg's DCT scaling). We ask for exactly the number of halvings the ADM loop would make, so
the draft replaces BOX halvings and nothing else; images whose short side is below twice the
target (most of ImageNet at 256, all of it at 512) decode in full either way. The error it
introduces is measured in tests/benchmarks/bench_decode.py and reported in BENCHMARKS.md.

Every failure to turn bytes into an image raises `ImageRejected` with a short ``reason``:
``empty``, ``not-an-image``, ``truncated`` or ``corrupt``.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # scaled to 8 bits, not clipped


class ImageRejected(Exception):
    """The bytes are not a usable image; ``reason`` is one short word for the rejects table."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def adm_halvings(size: tuple[int, int], target: int) -> int:
    """How many times the ADM crop halves an image of ``size`` (w, h) before its BICUBIC step."""
    w, h, k = size[0], size[1], 0
    while min(w, h) >= 2 * target:
        w, h, k = w // 2, h // 2, k + 1
    return k


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: alpha dropped (as torchvision's loader does), 16-bit scaled to 8-bit."""
    if image.mode == "RGB":
        return image
    if image.mode in SIXTEEN_BIT_MODES:
        # PIL's own conversion clips 16-bit values at 255 (a white image); scale instead.
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(array / 257.0), 0, 255).astype(np.uint8), mode="L")
    elif image.mode in ("La", "RGBa", "PA"):
        image = image.convert("RGBA")
    with warnings.catch_warnings():  # "palette images with transparency ..." is expected here
        warnings.simplefilter("ignore", UserWarning)
        return image.convert("RGB")


def adm_center_crop(image: Image.Image, target: int) -> np.ndarray:
    """The released ``center_crop_arr``: RGB PIL image -> (target, target, 3) uint8 array."""
    while min(*image.size) >= 2 * target:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = target / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top = (array.shape[0] - target) // 2
    left = (array.shape[1] - target) // 2
    return np.ascontiguousarray(array[top : top + target, left : left + target])


def decode(data: bytes, target: int, draft: bool = False) -> Image.Image:
    """Bytes -> RGB PIL image (fully loaded). Raises `ImageRejected` for anything unusable."""
    if not data:
        raise ImageRejected("empty", "zero-byte file")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # its message holds a memory address: say something reproducible
        raise ImageRejected("not-an-image", f"no image format recognised; first bytes {data[:16]!r}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageRejected("corrupt", f"{type(err).__name__}: {err}") from None
    try:
        if draft and image.format == "JPEG":
            k = adm_halvings(image.size, target)
            if k:
                image.draft("RGB", (image.size[0] >> k, image.size[1] >> k))
        image.load()
        return to_rgb(image)
    except OSError as err:
        reason = "truncated" if "truncated" in str(err) else "corrupt"
        raise ImageRejected(reason, f"{type(err).__name__}: {err}") from None
    except (ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        raise ImageRejected("corrupt", f"{type(err).__name__}: {err}") from None


def preprocess(data: bytes, target: int, draft: bool = False) -> np.ndarray:
    """Image file bytes -> ADM center crop, (target, target, 3) uint8 RGB."""
    return adm_center_crop(decode(data, target, draft), target)


def to_model_input(images: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1], as ToTensor + Normalize(0.5, 0.5)."""
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    return (x - np.float32(0.5)) / np.float32(0.5)
