"""Per-channel dataset statistics on the card (against numpy) and format version 1 datasets of main.

tests/latents/data/v1-sd-tiny was written by the version-1 writer (main before issue 19: SD-VAE
latents, ``scaling_factor`` on the card): 8 samples of (4, 8, 8) with flips, 2 classes, 2 shards.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.cli import main as sit
from latents.autoencoder import LatentNorm
from latents.dataset import LatentIndex
from latents.format import key_hash
from latents.reader import LatentDataset
from latents.verify import verify
from tests.latents.conftest import make_samples, write_dataset
from tests.pipeline.conftest import read_latents

V1 = Path(__file__).resolve().parent / "data" / "v1-sd-tiny"


def numpy_statistics(url: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of z = mean + std * eps over every stored latent (both flips), in float64."""
    arrays = np.stack([a for _, a in read_latents(url).values()]).astype(np.float64)  # (N, F, K, C, H, W)
    mean = arrays[:, :, 0]
    var = mean.var(axis=(0, 1, 3, 4))
    if arrays.shape[2] == 2:
        var = var + (arrays[:, :, 1] ** 2).mean(axis=(0, 1, 3, 4))  # the posterior variance
    return mean.mean(axis=(0, 1, 3, 4)), np.sqrt(var)


def test_card_statistics_equal_numpy(dataset):
    card = LatentIndex.open(dataset).card
    mean, std = numpy_statistics(dataset)
    np.testing.assert_allclose(card.channel_mean, mean, rtol=1e-6, atol=0)
    np.testing.assert_allclose(card.channel_std, std, rtol=1e-6, atol=0)


OFFSETS, SPREADS = np.array([-3.0, 0.5, 2.0, 7.0]), np.array([0.5, 1.0, 2.0, 4.0])


@pytest.fixture
def offset_dataset(tmp_path) -> str:
    """64 samples whose channel c is ~ N(OFFSETS[c], SPREADS[c]^2) (posterior std 0.01 * SPREADS[c])."""
    samples = make_samples(64, num_classes=10, seed=3)
    for key, (label, array) in samples.items():
        z = np.random.default_rng(key_hash(key)).standard_normal(array.shape[:1] + array.shape[2:])
        array[:, 0] = (OFFSETS.reshape(4, 1, 1) + SPREADS.reshape(4, 1, 1) * z).astype(np.float16)
        array[:, 1] = np.broadcast_to(0.01 * SPREADS.reshape(4, 1, 1), array[:, 1].shape).astype(np.float16)
        samples[key] = (label, array)
    url = str(tmp_path / "offsets")
    write_dataset(url, samples, samples_per_shard=16)
    return url


def test_training_step_with_dataset_norm_sees_unit_channels(offset_dataset, tmp_path, monkeypatch):
    from tests.trainer.conftest import tiny_config
    from trainer.export import read_export
    from trainer.train import train
    from trainer.transport import Transport

    card = LatentIndex.open(offset_dataset).card
    np.testing.assert_allclose(card.channel_mean, OFFSETS, atol=0.1)  # the set's known offsets
    seen = []
    original = Transport.training_losses

    def spy(self, model, x1, *args, **kwargs):
        seen.append(x1.detach().clone())
        return original(self, model, x1, *args, **kwargs)

    monkeypatch.setattr(Transport, "training_losses", spy)
    config = tiny_config(offset_dataset, str(tmp_path / "run"), total_steps=2, data={"latent_norm": "dataset"})
    train(config)
    x = torch.cat(seen)  # (2 steps x 32, 4, 8, 8): what the model trained on
    assert x.shape[0] == 64
    channel_mean, channel_std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
    assert channel_mean.abs().max() < 0.05 and (channel_std - 1).abs().max() < 0.05, (channel_mean, channel_std)
    raw = LatentDataset(offset_dataset, 64, transform=LatentNorm.VAE)  # the card's own (x 0.5): offsets remain
    assert raw.transform.norm == "vae" and raw.transform.scale == 0.5
    _, _, extra = read_export(str(tmp_path / "run" / "ema.safetensors"))
    assert extra["latent_transform"]["norm"] == "dataset"
    np.testing.assert_allclose(extra["latent_transform"]["shift"], card.channel_mean)


def test_version_1_dataset_reads_verifies_and_trains(tmp_path, capsys):
    from tests.trainer.conftest import tiny_config
    from trainer.export import read_export
    from trainer.train import train

    url = str(tmp_path / "v1")
    shutil.copytree(V1, url)
    card = LatentIndex.open(url).card
    assert card.format_version == 1 and card.autoencoder["class"] == "AutoencoderKL"
    assert verify(url).ok
    batch = next(iter(LatentDataset(url, 8, shuffle=False, random_flip=False, sample_posterior=False)))
    stored = read_latents(url)
    expected = np.stack([stored[k][1][0, 0] for k in batch["keys"]]).astype(np.float32)
    assert torch.equal(batch["latents"], torch.from_numpy(expected) * 0.18215)  # as version 1's reader did

    config = tiny_config(url, str(tmp_path / "run"), total_steps=2, model={"num_classes": 2},
                         data={"global_batch_size": 4})  # fmt: skip
    assert train(config).step == 2
    _, _, extra = read_export(str(tmp_path / "run" / "ema.safetensors"))
    assert extra["autoencoder"]["class"] == "AutoencoderKL" and extra["latent_transform"]["scale"] == 0.18215

    assert sit(["inspect", url]) == 0
    shown = capsys.readouterr().out
    assert "sit-latents v1" in shown and "AutoencoderKL" in shown and "z * 0.18215" in shown
    assert "posterior mean+std stored" in shown
