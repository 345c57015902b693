"""latents.autoencoder: every family's stored -> model -> decode path against diffusers' own encode/decode."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from latents.autoencoder import (
    AutoencoderError,
    Family,
    LatentTransform,
    dataset_transform,
    load_autoencoder,
    patchify,
)
from pipeline.encode import VaeEncoder, latent_spec
from tests.conftest import FAMILY_SHAPES
from tests.pipeline.conftest import assert_fp16_close

RESOLUTION = 64


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    """3 smooth 64 px test images, uint8 (B, H, W, 3)."""
    yy, xx = np.mgrid[0:RESOLUTION, 0:RESOLUTION] / RESOLUTION
    images = [np.stack([np.sin(6 * xx + k), np.cos(5 * yy - k), xx * yy], -1) for k in range(3)]
    return ((np.stack(images) + 1) * 127.5).clip(0, 255).astype(np.uint8)


def reference_to_model(family: str, vae, z: torch.Tensor) -> torch.Tensor:
    """Each family's model-space latent as the diffusers pipelines compute it, written out independently."""
    c = vae.config
    if family in ("sd", "dcae"):
        return z * c.scaling_factor
    if family == "flux1":  # SD3 / FLUX.1 pipelines: (latents - shift_factor) * scaling_factor
        return (z - c.shift_factor) * c.scaling_factor
    if family == "flux2":  # Flux2Pipeline._encode_vae_image: patchify 2x2, then batch-norm statistics
        b, ch, h, w = z.shape
        z = z.view(b, ch, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, ch * 4, h // 2, w // 2)
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + c.batch_norm_eps)
        return (z - mean) / std
    return z  # RAE: encode already normalised with latents_mean/std (and scaling_factor 1)


def direct(family: str, vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(latent, decode(latent)) with diffusers alone: posterior mean for Gaussian families, images in [-1, 1]."""
    with torch.no_grad():
        if family == "rae":
            z = vae.encode((x + 1) / 2).latent
            return z, vae.decode(z).sample * 2 - 1
        z = vae.encode(x).latent if family == "dcae" else vae.encode(x).latent_dist.mean
        return z, vae.decode(z).sample


@pytest.mark.parametrize("family", list(FAMILY_SHAPES))
def test_stored_model_latents_decode_like_diffusers(family, tiny_autoencoders, crops):
    """stored (float16) -> model space -> inverse -> the autoencoder's decode == decode(encode(image)) of diffusers."""
    from pipeline.preprocess import to_model_input

    path = str(tiny_autoencoders[family])
    ae = load_autoencoder(path)
    stored_shape, model_shape = FAMILY_SHAPES[family]
    spec = latent_spec(ae, RESOLUTION)
    assert spec.latent_shape == stored_shape and spec.stored == ("posterior" if ae.family.gaussian else "latent")
    transform = ae.own_transform()
    assert transform.model_shape(stored_shape) == model_shape

    keys = [f"k{i}" for i in range(len(crops))]
    stored = VaeEncoder(path, torch.float32, "cpu", spec)(crops, keys)  # (B, F, K, C, h, w) float16
    assert stored.shape == (len(crops), *spec.sample_shape)
    x = torch.from_numpy(to_model_input(crops))
    z_ref, images_ref = direct(family, ae.module, x)
    assert_fp16_close(stored[:, 0, 0], z_ref)  # what is stored is diffusers' latent, rounded once

    z = torch.from_numpy(stored[:, 0, 0].astype(np.float32))
    model = transform.to_model(z)
    assert tuple(model.shape[1:]) == model_shape
    expected = reference_to_model(family, ae.module, z)
    torch.testing.assert_close(model, expected, rtol=1e-5, atol=1e-5)  # the pipelines' convention
    back = transform.to_decode(model)
    torch.testing.assert_close(back, z, rtol=1e-6, atol=1e-6)  # exact inverse up to float32 rounding
    with torch.no_grad():
        ours = ae.decode(back)
        rounded = direct_decode(family, ae.module, z)  # diffusers' decode of the float16-rounded latent
    # equal to diffusers' decode(encode(image)) up to the float16 storage step: no closer to it than
    # the rounded latent's own decode is, and equal to that decode up to float32 noise
    storage_step = (rounded - images_ref).abs().max()
    assert (ours - images_ref).abs().max() <= 1.01 * storage_step + 1e-5
    torch.testing.assert_close(ours, rounded, rtol=1e-4, atol=1e-4)


def direct_decode(family: str, vae, z: torch.Tensor) -> torch.Tensor:
    out = vae.decode(z).sample
    return out * 2 - 1 if family == "rae" else out


def test_sd_transform_is_bitwise_the_old_scaling():
    z = torch.randn(2, 4, 8, 8)
    t = LatentTransform(scale=0.18215)
    assert torch.equal(t.to_model(z.clone(), inplace=True), z * 0.18215)
    assert torch.equal(t.to_decode(z), z / 0.18215)
    assert LatentTransform.from_dict(json.loads(json.dumps(t.to_dict()))) == t


def test_patchify_and_dataset_transform_invert():
    z = torch.randn(3, 4, 8, 6, dtype=torch.float64)
    p = patchify(z, 2)
    assert p.shape == (3, 16, 4, 3) and torch.equal(p[:, 4 * 1 + 2 * 1 + 0, 0, 0], z[:, 1, 1, 0])
    t = dataset_transform(LatentTransform(patch=2), [0.5, -1, 2, 0], [2, 1, 0.5, 3])
    assert t.norm == "dataset" and len(t.shift) == 16 and t.shift[4:8] == (-1.0,) * 4
    torch.testing.assert_close(t.to_decode(t.to_model(z)), z)
    with pytest.raises(ValueError, match="std 0"):
        dataset_transform(LatentTransform(), [0.0], [0.0])


def test_unsupported_autoencoder_is_named(tmp_path):
    from diffusers import AutoencoderTiny

    AutoencoderTiny(encoder_block_out_channels=(8,), decoder_block_out_channels=(8,), num_encoder_blocks=(1,),
                    num_decoder_blocks=(1,)).save_pretrained(tmp_path / "taesd")  # fmt: skip
    with pytest.raises(AutoencoderError, match=r"taesd/config\.json: autoencoder class 'AutoencoderTiny' is not "):
        load_autoencoder(str(tmp_path / "taesd"))
    assert {f.value for f in Family} == {"AutoencoderKL", "AutoencoderKLFlux2", "AutoencoderDC", "AutoencoderRAE"}


def test_missing_optional_package_is_one_line(tiny_autoencoders, monkeypatch):
    import diffusers

    def no_transformers(*args, **kwargs):
        raise ImportError("AutoencoderRAE requires the transformers library")

    monkeypatch.setattr(diffusers.AutoencoderRAE, "from_pretrained", no_transformers)
    with pytest.raises(AutoencoderError, match=r"\(AutoencoderRAE\) needs an optional package: .*sit-pipeline\[rae\]"):
        load_autoencoder(str(tiny_autoencoders["rae"]))
