"""The VAE stage: stored latents are a direct `vae.encode` of the crops and their mirrors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latents.autoencoder import load_autoencoder
from latents.format import STORED_SAMPLE
from pipeline.encode import VaeEncoder, latent_spec, sample_noise
from pipeline.preprocess import preprocess, to_model_input
from tests.pipeline.conftest import assert_fp16_close


@pytest.fixture(scope="module")
def crops(images) -> np.ndarray:
    good = [im for im in images if not im.broken][:6]
    return np.stack([preprocess(im.data, 64) for im in good])


def test_stored_latents_equal_direct_encode(tiny_vae_dir, crops):
    ae = load_autoencoder(str(tiny_vae_dir))
    vae = ae.module
    spec = latent_spec(ae, 64)
    assert spec.latent_shape == (4, 8, 8) and spec.sample_shape == (2, 2, 4, 8, 8)
    keys = [f"k{i}" for i in range(len(crops))]
    stored = VaeEncoder(str(tiny_vae_dir), torch.float32, "cpu", spec)(crops, keys)  # (B, F, K, C, h, w)
    assert stored.dtype == np.float16 and stored.shape == (len(crops), *spec.sample_shape)
    x = torch.from_numpy(to_model_input(crops))  # (B, 3, H, W) in [-1, 1]
    with torch.no_grad():
        for flip, images in enumerate((x, x.flip(-1))):
            posterior = vae.encode(images).latent_dist  # this batch alone: float32 sums differ in the last bits
            assert_fp16_close(stored[:, flip, 0], posterior.mean)
            assert_fp16_close(stored[:, flip, 1], posterior.std)
    assert not np.array_equal(stored[:, 0, 0], stored[:, 1, 0])  # the mirror is a different image


def test_sampled_latents_are_deterministic_per_key(tiny_vae_dir, crops):
    spec = latent_spec(load_autoencoder(str(tiny_vae_dir)), 64, STORED_SAMPLE)
    encoder = VaeEncoder(str(tiny_vae_dir), torch.float32, "cpu", spec, seed=3)
    keys = [f"k{i}" for i in range(len(crops))]
    a = encoder(crops, keys)
    assert a.shape == (len(crops), 2, 1, 4, 8, 8)
    np.testing.assert_array_equal(a, encoder(crops, keys))
    eps = sample_noise(keys, (2, 4, 8, 8), seed=3)
    posterior = encoder.vae.encode(torch.cat([encoder_input(crops), encoder_input(crops).flip(-1)])).latent_dist
    z = (posterior.mean + posterior.std * torch.cat([eps[:, 0], eps[:, 1]])).detach()
    assert_fp16_close(a[:, 0, 0], z[: len(crops)])
    assert not np.array_equal(a, VaeEncoder(str(tiny_vae_dir), torch.float32, "cpu", spec, seed=4)(crops, keys))


def encoder_input(crops: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(to_model_input(crops))


def test_bf16_is_close_and_fp16_refused(tiny_vae_dir, crops):
    from latents.autoencoder import vae_dtype

    spec = latent_spec(load_autoencoder(str(tiny_vae_dir)), 64)
    keys = [f"k{i}" for i in range(len(crops))]
    fp32 = VaeEncoder(str(tiny_vae_dir), torch.float32, "cpu", spec)(crops, keys).astype(np.float32)
    bf16 = VaeEncoder(str(tiny_vae_dir), vae_dtype("bf16"), "cpu", spec)(crops, keys).astype(np.float32)
    assert np.abs(bf16 - fp32).max() < 0.1 * np.abs(fp32).max()
    with pytest.raises(ValueError, match="fp16"):
        vae_dtype("fp16")
