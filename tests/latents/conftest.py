"""Builders for small latent datasets."""

from __future__ import annotations

import numpy as np
import pytest

from latents.format import LatentSpec
from latents.writer import DatasetWriter

SPEC = LatentSpec((4, 8, 8))
SCALE = 0.5


def make_samples(n: int, spec: LatentSpec = SPEC, num_classes: int = 10, seed: int = 0) -> dict:
    """key -> (label, (F, K, C, H, W) float16 array) with positive stds."""
    rng = np.random.default_rng(seed)
    samples = {}
    for i in range(n):
        array = rng.standard_normal(spec.sample_shape).astype(np.float32) * 3
        if spec.frame_shape[0] == 2:
            array[:, 1] = np.abs(array[:, 1]) * 0.05 + 0.01
        samples[f"img/{i:05d}"] = (int(rng.integers(num_classes)), array.astype(np.float16))
    return samples


def write_dataset(url: str, samples: dict, spec: LatentSpec = SPEC, samples_per_shard: int = 17, **kw):
    with DatasetWriter(
        url,
        spec,
        resolution=64,
        vae="test/tiny-vae",
        scaling_factor=SCALE,
        num_classes=kw.pop("num_classes", 10),
        samples_per_shard=samples_per_shard,
        source_fingerprint="synthetic",
        **kw,
    ) as writer:
        for key, (label, array) in samples.items():
            writer.add(key, label, array)
    return writer


@pytest.fixture
def samples() -> dict:
    return make_samples(100)


@pytest.fixture
def dataset(tmp_path, samples) -> str:
    url = str(tmp_path / "ds")
    write_dataset(url, samples)
    return url
