"""Training-time options against independent computations: logit-normal times (scipy's normal
distribution and the density integrated numerically), SD3's time shift in SD3's own convention,
shifted grids, and the velocity-direction loss term by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from trainer.transport import Prediction, TimeSampling, Transport, shift_time, time_grid

N = 200_000  # draws per distribution test: KS critical value at alpha = 1e-3 is 1.95 / sqrt(N) = 0.0044


def sd3_shift(t_sd3: np.ndarray, s: float) -> np.ndarray:
    """SD3 (Esser et al. 2024) eq. 23 as written there, with t = 1 pure noise."""
    return s * t_sd3 / (1 + (s - 1) * t_sd3)


def logit_normal_pdf(t: float, m: float, s: float) -> float:
    """SD3 eq. 19: exp(-(logit t - m)^2 / 2s^2) / (s sqrt(2 pi) t (1 - t))."""
    return math.exp(-((math.log(t / (1 - t)) - m) ** 2) / (2 * s * s)) / (s * math.sqrt(2 * math.pi) * t * (1 - t))


def draw(transport: Transport, seed: int = 0) -> np.ndarray:
    return transport.sample_time(N, torch.Generator().manual_seed(seed)).double().numpy()


@pytest.mark.parametrize(("m", "s"), [(0.0, 1.0), (0.5, 0.7)])
def test_logit_normal_times_follow_the_density(m, s):
    t = draw(Transport(time_sampling=TimeSampling.LOGIT_NORMAL, logit_mean=m, logit_std=s))
    # KS against the distribution function of sigmoid(N(m, s^2)), from scipy's normal
    assert stats.kstest(t, lambda x: stats.norm.cdf((np.log(x / (1 - x)) - m) / s)).pvalue > 1e-3
    # chi-square of a 20-bin histogram against the density formula integrated by quadrature
    edges = np.linspace(0, 1, 21)
    probs = np.array([integrate.quad(logit_normal_pdf, a, b, args=(m, s))[0] for a, b in itertools.pairwise(edges)])
    assert abs(probs.sum() - 1) < 1e-6
    counts, _ = np.histogram(t, edges)
    assert stats.chisquare(counts, probs * N).pvalue > 1e-3
    # the test can fail: the mirrored distribution (SD3's sign of m) is rejected
    if m:
        assert stats.kstest(t, lambda x: stats.norm.cdf((np.log(x / (1 - x)) + m) / s)).pvalue < 1e-6


def test_positive_mean_favours_data_in_our_convention():
    t = draw(Transport(time_sampling=TimeSampling.LOGIT_NORMAL, logit_mean=1.0))
    assert t.mean() > 0.6  # t = 1 is data here


@pytest.mark.parametrize("s", [0.5, 1.0, 3.0])
def test_shift_is_sd3s_formula_in_our_convention(s):
    t = np.linspace(0, 1, 101)
    ours = shift_time(torch.from_numpy(t), s).numpy()
    assert np.allclose(ours, 1 - sd3_shift(1 - t, s), atol=1e-12)  # t_ours = 1 - t_SD3 on both sides
    assert ours[0] == 0 and ours[-1] == 1
    if s > 1:  # more time near noise (t = 0)
        assert (ours[1:-1] < t[1:-1]).all()


def test_shifted_uniform_training_times():
    s = 3.0
    t = draw(Transport(time_shift=s))
    # u uniform, t = shift(u): P(t <= x) = P(u <= shift^-1(x)), and SD3's inverse is the shift by 1/s
    cdf = lambda x: 1 - sd3_shift(1 - x, 1 / s)  # noqa: E731
    assert stats.kstest(t, cdf).pvalue > 1e-3
    assert stats.kstest(t, "uniform").pvalue < 1e-6
    assert np.median(t) < 0.3  # half the times in the noisiest 30 %


def test_uniform_without_shift_is_the_released_draw_bit_for_bit():
    for transport in (Transport(), Transport(prediction=Prediction.SCORE)):
        t0, t1 = transport.train_interval()
        expected = torch.rand(64, generator=torch.Generator().manual_seed(3)) * (t1 - t0) + t0
        assert torch.equal(transport.sample_time(64, torch.Generator().manual_seed(3)), expected)


def test_options_stay_inside_the_training_interval():
    transport = Transport(prediction=Prediction.NOISE, time_sampling=TimeSampling.LOGIT_NORMAL, time_shift=2.0)
    t = draw(transport)
    assert t.min() >= 1e-3 and t.max() <= 1 - 1e-3


def test_time_grid():
    assert torch.equal(time_grid(0.0, 0.96, 10), torch.linspace(0.0, 0.96, 11, dtype=torch.float64))
    grid = time_grid(0.001, 0.96, 10, 3.0)
    u = np.linspace(0, 1, 11)
    assert np.allclose(grid.numpy(), 0.001 + 0.959 * (1 - sd3_shift(1 - u, 3.0)), atol=1e-12)
    assert grid[0] == 0.001 and grid[-1] == 0.96
    steps = np.diff(grid.numpy())
    assert (np.diff(steps) > 0).all()  # small steps near noise, growing towards data


def test_direction_loss_by_hand():
    torch.manual_seed(0)
    x0, x1 = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0.2, 0.5, 0.9])
    out = torch.randn(3, 4, 2, 2)
    plain = Transport().loss_terms(out, t, x0, x1)
    assert set(plain) == {"loss"}
    terms = Transport(direction_weight=0.5).loss_terms(out, t, x0, x1)
    u = (x1 - x0).numpy()  # Linear path: u_t = x1 - x0
    o = out.numpy()
    cos = (o * u).sum(1) / (np.linalg.norm(o, axis=1) * np.linalg.norm(u, axis=1))  # over channels, (B, H, W)
    direction = (1 - cos).mean(axis=(1, 2))
    mse = ((o - u) ** 2).mean(axis=(1, 2, 3))
    assert np.allclose(terms["direction"].numpy(), direction, atol=1e-6)
    assert np.allclose(terms["mse"].numpy(), mse, atol=1e-6)
    assert np.allclose(terms["loss"].numpy(), mse + 0.5 * direction, atol=1e-6)
    assert torch.equal(plain["loss"], terms["mse"])
    # same direction, any length: 0; opposite: 2
    target = x1 - x0
    assert Transport(direction_weight=1).loss_terms(3 * target, t, x0, x1)["direction"].abs().max() < 1e-6
    assert torch.allclose(
        Transport(direction_weight=1).loss_terms(-target, t, x0, x1)["direction"], torch.full((3,), 2.0)
    )


def test_direction_loss_needs_velocity_and_options_are_checked():
    with pytest.raises(ValueError, match="velocity prediction"):
        Transport(prediction=Prediction.NOISE, direction_weight=1.0)
    for bad in ({"logit_std": 0.0}, {"time_shift": -1.0}, {"direction_weight": -0.1}):
        with pytest.raises(ValueError):
            Transport(**bad)


def test_training_losses_return_each_term():
    model = lambda x, t, y: x  # noqa: E731
    x1 = torch.randn(8, 4, 4, 4)
    terms = Transport(direction_weight=1.0).training_losses(model, x1, torch.Generator().manual_seed(0), y=None)
    assert {"loss", "mse", "direction", "t", "pred"} <= set(terms)
    assert torch.allclose(terms["loss"], terms["mse"] + terms["direction"])


def test_trainer_logs_each_loss_term_overall_and_by_time_bin(tmp_path):
    import json

    from tests.trainer.conftest import tiny_config, write_toy_dataset
    from trainer.train import train

    data = write_toy_dataset(str(tmp_path / "ds"), n=16)
    config = tiny_config(
        data,
        str(tmp_path / "run"),
        total_steps=2,
        data={"global_batch_size": 8},
        log={"every": 1, "time_bins": 2},
        transport={"direction_weight": 0.5, "time_sampling": "logit_normal", "time_shift": 2.0},
    )
    train(config)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 2
    for r in steps:
        assert r["loss"] == pytest.approx(r["mse"] + 0.5 * r["direction"], rel=1e-6)  # float32 per sample
        assert 0 <= r["direction"] <= 2
        for i in range(2):
            if f"loss_t{i}" in r:
                assert r[f"loss_t{i}"] == pytest.approx(r[f"mse_t{i}"] + 0.5 * r[f"direction_t{i}"], rel=1e-6)
