"""Fréchet distance, Inception Score, precision/recall and `sit eval` (acceptance 3 of issue 9).

The Fréchet distance is checked against an independent float64 route: tr((S1 S2)^(1/2)) equals
the sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2) (symmetric, so eigh). On
well-conditioned 64-dim statistics both routes agree to ~1e-12 relative; 1e-6 is the bar.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from cluster.cli import main
from sampling.fid import (
    InceptionNotFoundError,
    Statistics,
    StatisticsError,
    extract,
    frechet_distance,
    inception_score,
    load_inception,
    precision_recall,
)


def random_stats(rng: np.random.Generator, d: int, n: int = 500) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + rng.standard_normal(d)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def independent_fid(mu1, s1, mu2, s2) -> float:
    root = linalg.sqrtm(s1).real
    eig = linalg.eigh(root @ s2 @ root, eigvals_only=True)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frechet_distance_matches_an_independent_computation(seed):
    rng = np.random.default_rng(seed)
    mu1, s1 = random_stats(rng, 64)
    mu2, s2 = random_stats(rng, 64)
    ours = frechet_distance(mu1, s1, mu2, s2)
    ref = independent_fid(mu1, s1, mu2, s2)
    assert ours == pytest.approx(ref, rel=1e-6)
    assert ours > 1.0


def test_frechet_distance_of_identical_statistics_is_zero():
    mu, s = random_stats(np.random.default_rng(5), 64)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-8
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s1, s2
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[1.0]])) == pytest.approx(5)


def test_near_singular_covariances_stay_finite():
    """Fewer samples than dimensions: rank-deficient covariances, as with small sample sets."""
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((20, 64)), rng.standard_normal((20, 64)) + 0.5
    sa, sb = Statistics.of(a), Statistics.of(b)
    fid = frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)
    assert np.isfinite(fid) and fid > 0
    assert fid == pytest.approx(independent_fid(sa.mu, sa.sigma, sb.mu, sb.sigma), rel=1e-3)


def test_mismatched_or_broken_statistics_are_refused():
    mu, s = random_stats(np.random.default_rng(0), 8)
    with pytest.raises(StatisticsError, match=r"mu \(8,\) vs \(7,\)"):
        frechet_distance(mu, s, mu[:7], s[:7, :7])
    with pytest.raises(StatisticsError, match="sigma2 holds NaN"):
        frechet_distance(mu, s, mu, np.full_like(s, np.nan))


def test_inception_score_extremes():
    k = 10
    assert inception_score(np.full((100, k), 1 / k), splits=5)[0] == pytest.approx(1.0)
    one_hot = np.eye(k)[np.arange(100) % k]  # confident and balanced: IS = number of classes
    assert inception_score(one_hot, splits=5)[0] == pytest.approx(k, rel=1e-6)


def test_precision_recall_extremes():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((200, 8)).astype(np.float32)
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    assert precision_recall(real, real + 100) == (0.0, 0.0)


def test_missing_inception_file_says_how_to_get_it(tmp_path):
    with pytest.raises(InceptionNotFoundError, match=r"inception-2015-12-05\.pt"):
        load_inception(str(tmp_path / "nope.pt"))


def write_images(folder, images: np.ndarray) -> None:
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:05d}.png")


def test_sit_eval_end_to_end(tmp_path, inception_standin, capsys):
    rng = np.random.default_rng(0)
    fake = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    real = np.clip(fake.astype(int) + rng.integers(-60, 60, fake.shape), 0, 255).astype(np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=fake, arr_1=np.zeros(40, dtype=np.int64))
    write_images(tmp_path / "real", real)
    detector = load_inception(str(inception_standin))
    f_fake = extract(detector, iter([fake]))
    f_real = extract(detector, iter([real]))
    s_fake, s_real = Statistics.of(f_fake.features), Statistics.of(f_real.features)
    expected = frechet_distance(s_fake.mu, s_fake.sigma, s_real.mu, s_real.sigma)

    args = ["eval", str(tmp_path / "samples.npz"), "--inception", str(inception_standin), "--batch-size", "16"]
    stats = tmp_path / "ref-stats.npz"
    assert main([*args, "--ref", str(tmp_path / "real"), "--save-ref-stats", str(stats), "--json", "--quiet"]) == 0
    from_images = json.loads(capsys.readouterr().out)
    assert from_images["fid"] == pytest.approx(expected, rel=1e-9)
    assert from_images["num_samples"] == from_images["num_reference"] == 40
    assert from_images["inception_score"] == pytest.approx(inception_score(f_fake.probs)[0], rel=1e-9)
    assert from_images["reference_from"] == "images"

    # the saved reference statistics (ADM reference batch form: mu, sigma) give the same FID
    assert main([*args, "--ref", str(stats), "--json", "--quiet"]) == 0
    from_stats = json.loads(capsys.readouterr().out)
    assert from_stats["reference_from"] == "statistics"
    assert from_stats["fid"] == pytest.approx(expected, rel=1e-9)

    assert main([*args, "--ref", str(tmp_path / "real"), "--precision-recall", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "FID:" in printed and "precision:" in printed and "recall:" in printed


def test_sit_eval_bad_inputs_are_one_line_errors(tmp_path, inception_standin, capsys):
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    code = main(["eval", str(tmp_path / "samples.npz"), "--ref", str(tmp_path), "--inception", str(tmp_path / "x.pt")])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("sit eval: error: Inception network not found") and err.count("\n") == 1
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    code = main(["eval", str(tmp_path / "floats.npz"), "--ref", str(tmp_path), "--inception", str(inception_standin)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert re.match(r"sit eval: error: .*floats\.npz: arr_0 is float32", err)


def test_extract_feeds_uint8_nchw(inception_standin):
    calls = []

    class Spy(torch.nn.Module):
        def forward(self, img, return_features=False, use_fp16=False, no_output_bias=False):
            calls.append((img.dtype, tuple(img.shape), return_features, no_output_bias))
            return torch.zeros(img.shape[0], 4)

    extract(Spy(), iter([np.zeros((2, 16, 16, 3), np.uint8)]))
    assert calls == [(torch.uint8, (2, 3, 16, 16), True, False), (torch.uint8, (2, 3, 16, 16), False, True)]
