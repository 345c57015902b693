"""Preprocessing: every mode to RGB, the ADM crop exactly as released, [-1, 1] scaling, draft decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.preprocess import ImageRejected, adm_center_crop, decode, preprocess, to_model_input
from pipeline.synthetic import BROKEN, MODES, SIZES, encode_image, synthetic_images


def released_center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's center_crop_arr, as in the released SiT/DiT train.py (returns the array, not a PIL image)."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def _photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(height // 30 + 2, width // 30 + 2, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))


@pytest.mark.parametrize("target", [256, 512])
@pytest.mark.parametrize("size", [*SIZES, (1030, 2100), (4000, 3000)])
def test_crop_equals_released(size, target):
    image = Image.fromarray(_photo(*size))
    ours = adm_center_crop(image, target)
    assert ours.shape == (target, target, 3) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, released_center_crop_arr(image, target))


@pytest.mark.parametrize("mode,fmt", MODES)
def test_every_mode_becomes_rgb(mode, fmt):
    data = encode_image(_photo(120, 90), mode, fmt)
    image = Image.open(io.BytesIO(data))
    assert image.mode.startswith(mode[0])  # the file really holds that mode
    crop = preprocess(data, 64)
    assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
    assert 20 < crop.mean() < 235, "a mode conversion that blacks out or whites out the image"


def test_sixteen_bit_is_scaled_not_clipped():
    gray = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG")
    rgb = np.asarray(decode(buf.getvalue(), 64))
    np.testing.assert_allclose(rgb[..., 0], gray / 257.0, atol=0.5)  # PIL's convert("RGB") would clip at 255


def test_model_input_matches_totensor_normalize():
    crops = np.random.default_rng(0).integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    # torchvision: ToTensor() then Normalize([0.5] * 3, [0.5] * 3), written out
    expected = (torch.from_numpy(crops).permute(0, 3, 1, 2).float().div(255) - 0.5) / 0.5
    assert torch.equal(torch.from_numpy(to_model_input(crops)), expected)
    assert to_model_input(crops).min() >= -1 and to_model_input(crops).max() <= 1


def test_broken_files_give_their_reason():
    for image in synthetic_images(num_classes=1, per_class=1, broken=len(BROKEN)):
        if image.broken:
            with pytest.raises(ImageRejected) as err:
                preprocess(image.data, 64)
            assert err.value.reason == image.broken


def test_draft_decoding_is_close_and_only_replaces_halvings():
    # draft off is the released decode exactly; on, the error is small and only large images change
    data = encode_image(_photo(1200, 900), "RGB", "JPEG")
    full = preprocess(data, 256, draft=False)
    np.testing.assert_array_equal(full, released_center_crop_arr(Image.open(io.BytesIO(data)).convert("RGB"), 256))
    drafted = preprocess(data, 256, draft=True)
    error = np.abs(drafted.astype(float) - full.astype(float))
    assert 0 < error.mean() < 2.0, error.mean()  # draft was used; error measured in BENCHMARKS.md
    small = encode_image(_photo(500, 375), "RGB", "JPEG")  # short side < 2 * 256: no halving, no draft
    np.testing.assert_array_equal(preprocess(small, 256, draft=True), preprocess(small, 256, draft=False))
