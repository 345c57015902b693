"""FID, Inception Score and precision/recall from the standard TorchScript Inception network.

Features come from ``inception-2015-12-05.pt``, the TorchScript port of TensorFlow's 2015
Inception-v3 that StyleGAN2-ADA/StyleGAN3, EDM/EDM2 and clean-fid load; it reproduces the
network behind published FIDs. It is never downloaded here: pass the local file. Its interface,
as those codebases call it:

    detector(images, return_features=True)  -> (N, 2048) pool features      (for FID, P/R)
    detector(images, no_output_bias=True)   -> (N, 1008) class probabilities (for IS)

with ``images`` uint8 NCHW RGB at any resolution (the network resizes to 299 itself).

Statistics are float64 means and unbiased covariances. The Fréchet distance
``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (Heusel et al. 2017, eq. 6) follows the
standard implementations (pytorch-fid, the ADM evaluator): scipy's matrix square root; if it is
not finite (near-singular covariances), eps * I is added to both covariances and it is retried;
an imaginary residue is dropped if the diagonal's imaginary part is below 1e-3, else an error.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from scipy import linalg

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"


class InceptionNotFoundError(FileNotFoundError):
    """The Inception TorchScript file is not where the user said; the message says how to get it."""


class StatisticsError(ValueError):
    """Statistics that cannot be compared (shapes differ, non-finite values, complex residue)."""


@dataclass
class Statistics:
    """Mean (D,) and covariance (D, D) of features, float64, and the number of images."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int

    @classmethod
    def of(cls, features: np.ndarray) -> Statistics:
        if features.shape[0] < 2:
            raise StatisticsError(f"statistics need at least 2 images, got {features.shape[0]}")
        f = features.astype(np.float64)
        return cls(f.mean(axis=0), np.cov(f, rowvar=False), f.shape[0])


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise StatisticsError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise StatisticsError(f"{name} holds NaN or Inf")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # near-singular product: offset both covariances
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        residue = np.abs(np.diagonal(covmean).imag).max()
        if residue > 1e-3:
            raise StatisticsError(f"matrix square root has an imaginary component {residue:.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016): mean and std over ``splits`` of exp(E KL(p(y|x) || p(y)))."""
    probs = probs.astype(np.float64)
    scores = []
    for part in np.array_split(probs, min(splits, len(probs))):
        kl = part * (np.log(part + 1e-30) - np.log(part.mean(axis=0, keepdims=True) + 1e-30))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, block: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds of features.

    Precision: fraction of fake features inside the real manifold (the union of balls around each
    real feature reaching its k-th nearest real neighbour); recall: the converse.
    """
    real_t, fake_t = torch.from_numpy(real).float(), torch.from_numpy(fake).float()
    return _coverage(real_t, _radii(real_t, k, block), fake_t, block), _coverage(
        fake_t, _radii(fake_t, k, block), real_t, block
    )


def _radii(feats: torch.Tensor, k: int, block: int) -> torch.Tensor:
    if feats.shape[0] <= k:
        raise StatisticsError(f"precision/recall needs more than k={k} images per set, got {feats.shape[0]}")
    out = [torch.cdist(feats[i : i + block], feats).kthvalue(k + 1, dim=1).values for i in range(0, len(feats), block)]
    return torch.cat(out)  # k + 1: the nearest is the point itself


def _coverage(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor, block: int) -> float:
    inside = [
        (torch.cdist(queries[i : i + block], manifold) <= radii[None]).any(dim=1) for i in range(0, len(queries), block)
    ]
    return float(torch.cat(inside).float().mean())


def load_inception(path: str, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """The TorchScript Inception network from a local file (never downloaded)."""
    if not path or not os.path.isfile(path):
        raise InceptionNotFoundError(
            f"Inception network not found at {path!r}. Nothing is downloaded at run time: fetch "
            f"{INCEPTION_URL} on a machine with network and pass --inception {INCEPTION_FILE}"
        )
    try:
        with warnings.catch_warnings():  # the file is TorchScript: torch.jit is the way to read it
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(path, map_location=device).eval()
    except RuntimeError as err:
        raise InceptionNotFoundError(f"{path}: not a TorchScript file ({err})") from None


@dataclass
class Features:
    """Per-image outputs of the Inception network."""

    features: np.ndarray  # float32 (N, D) pool features
    probs: np.ndarray  # float32 (N, classes) for the Inception Score


def extract(detector, batches: Iterator[np.ndarray], device: str | torch.device = "cpu", progress=None) -> Features:
    """Run ``detector`` over uint8 (n, H, W, 3) batches."""
    feats, probs = [], []
    with torch.no_grad():
        for images in batches:
            x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(device)  # (n, 3, H, W) uint8
            feats.append(detector(x, return_features=True).float().cpu().numpy())
            probs.append(detector(x, no_output_bias=True).float().cpu().numpy())
            if progress is not None:
                progress.update(len(images))
    if not feats:
        raise StatisticsError("no images to evaluate")
    return Features(np.concatenate(feats), np.concatenate(probs))
