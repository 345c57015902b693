"""`sit eval`'s library function: FID (+ Inception Score, optionally precision/recall) of a
sample set against a reference, with the TorchScript Inception network (see `sampling.fid`)."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import fsspec
import numpy as np
import torch

from sampling.fid import Statistics, extract, frechet_distance, inception_score, load_inception, precision_recall
from sampling.image_sources import ImageSourceError, npz_keys, open_images, read_npz_arrays


@dataclass
class EvalResult:
    samples: str
    reference: str
    num_samples: int
    num_reference: int
    feature_dim: int
    fid: float
    inception_score: float
    inception_score_std: float
    precision: float | None = None
    recall: float | None = None
    reference_from: str = "statistics"  # "statistics" (mu/sigma of the file) or "images"

    def to_dict(self) -> dict:
        return asdict(self)


def _is_statistics(url: str) -> bool:
    if not url.endswith(".npz"):
        return False
    try:
        keys = npz_keys(url)
    except FileNotFoundError:
        raise FileNotFoundError(f"reference not found: {url}") from None
    return "mu" in keys and "sigma" in keys


def evaluate(
    samples: str,
    reference: str,
    inception: str,
    batch_size: int = 100,
    device: str | None = None,
    limit: int | None = None,
    with_precision_recall: bool = False,
    save_reference_stats: str | None = None,
    progress: bool = True,
) -> EvalResult:
    """FID and IS of ``samples`` against ``reference`` (see `sampling.image_sources` for the forms)."""
    from tqdm import tqdm

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    detector = load_inception(inception, device)
    source = open_images(samples)
    n = source.count if limit is None else min(limit, source.count)
    with tqdm(total=n, desc="inception (samples)", unit="img", disable=not progress) as bar:
        fake = extract(detector, source.batches(batch_size, limit), device, bar)
    fake_stats = Statistics.of(fake.features)
    real_features = None
    if _is_statistics(reference) and not with_precision_recall:
        arrays = read_npz_arrays(reference, ("mu", "sigma"))
        real_stats = Statistics(arrays["mu"], arrays["sigma"], 0)
        reference_from = "statistics"
    else:
        ref = open_images(reference)
        with tqdm(total=ref.count, desc="inception (reference)", unit="img", disable=not progress) as bar:
            real_features = extract(detector, ref.batches(batch_size), device, bar).features
        real_stats = Statistics.of(real_features)
        reference_from = "images"
    if real_stats.mu.shape != fake_stats.mu.shape:
        raise ImageSourceError(
            f"{reference}: {real_stats.mu.shape[0]} features per image, but {inception} gives {fake_stats.mu.shape[0]}"
        )
    if save_reference_stats:
        buf = io.BytesIO()
        np.savez(buf, mu=real_stats.mu, sigma=real_stats.sigma)
        with fsspec.open(save_reference_stats, "wb") as f:
            f.write(buf.getvalue())
    fid = frechet_distance(fake_stats.mu, fake_stats.sigma, real_stats.mu, real_stats.sigma)
    is_mean, is_std = inception_score(fake.probs)
    result = EvalResult(
        samples=samples,
        reference=reference,
        num_samples=fake_stats.count,
        num_reference=real_stats.count,
        feature_dim=int(fake_stats.mu.shape[0]),
        fid=fid,
        inception_score=is_mean,
        inception_score_std=is_std,
        reference_from=reference_from,
    )
    if with_precision_recall:
        result.precision, result.recall = precision_recall(real_features, fake.features)
    return result
