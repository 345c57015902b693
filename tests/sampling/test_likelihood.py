import math

import pytest
import torch

from sampling.gaussian import GaussianData
from sampling.likelihood import log_likelihood, standard_normal_logp
from trainer.transport import PathType, Prediction, Transport

MEAN = torch.linspace(-1.0, 1.0, 16, dtype=torch.float64).reshape(4, 2, 2)
STD = 0.5


def data_points(n=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return MEAN + STD * torch.randn(n, 4, 2, 2, dtype=torch.float64, generator=gen)


@pytest.mark.parametrize("path_type", [PathType.LINEAR, PathType.GVP])
def test_velocity_model_likelihood_is_the_exact_data_density(path_type):
    transport = Transport(path_type)
    data = GaussianData(transport, MEAN, STD)
    x = data_points()
    result = log_likelihood(data.model, transport, x, atol=1e-8, rtol=1e-8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(result.logp, data.logp(x), atol=1e-4, rtol=0)
    torch.testing.assert_close(result.noise, (x - MEAN) / STD, atol=1e-4, rtol=0)
    torch.testing.assert_close(result.bits_per_dim, -data.logp(x) / (16 * math.log(2)), atol=1e-5, rtol=0)
    assert result.nfe > 0


@pytest.mark.parametrize("prediction", list(Prediction))
@pytest.mark.parametrize("path_type", list(PathType))
def test_likelihood_is_change_of_variables_of_the_flow(path_type, prediction):
    """Over [t0, t1] the flow is affine with slope c = sqrt(var(t0) / var(t1)), so the ODE
    likelihood is exactly log N(T(x); 0, I) + D log c, whatever the path and prediction."""
    transport = Transport(path_type, prediction)
    data = GaussianData(transport, MEAN, STD)
    x = data_points(16)
    t0, t1 = transport.ode_interval()
    _, var0 = data.marginal(torch.tensor([t0], dtype=torch.float64), x[:1])
    _, var1 = data.marginal(torch.tensor([t1], dtype=torch.float64), x[:1])
    expected = standard_normal_logp(data.flow_map(x, t1, t0)) + 16 * 0.5 * torch.log(var0 / var1).flatten()
    result = log_likelihood(data.model, transport, x, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(result.logp, expected, atol=1e-4, rtol=0)


def test_probe_from_generator_is_reproducible():
    # A non-isotropic model, so the Hutchinson estimate depends on the probe.
    transport = Transport()
    weights = torch.linspace(0.5, 1.5, 16, dtype=torch.float64).reshape(4, 2, 2)

    def model(x, t):
        return -weights * x + torch.roll(x, 1, dims=-1) * 0.3

    x = data_points(4)
    a = log_likelihood(model, transport, x, method="euler", num_steps=10, generator=torch.Generator().manual_seed(1))
    b = log_likelihood(model, transport, x, method="euler", num_steps=10, generator=torch.Generator().manual_seed(1))
    c = log_likelihood(model, transport, x, method="euler", num_steps=10, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.logp, b.logp) and not torch.equal(a.logp, c.logp)
    assert a.nfe == 10


class CorrelatedGaussian:
    """x1 ~ N(m, Q diag(s^2) Q^T): a non-isotropic, correlated Gaussian with its exact velocity.

    In the eigenbasis y = Q^T (x - alpha m) every coordinate is an independent 1-D Gaussian with
    variance alpha^2 s_i^2 + sigma^2, so E[x1 | x_t] and E[x0 | x_t] are affine in x_t and the
    velocity's Jacobian Q diag(k(t)) Q^T is a full matrix: a Hutchinson probe that only got the
    diagonal right (e.g. one sign shared by every coordinate) would estimate sum_ij J_ij instead
    of the trace, which an isotropic test (J = c I) cannot tell apart.
    """

    def __init__(self, transport: Transport, dim: int = 16, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.path = transport.path
        self.q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64, generator=gen))
        self.s2 = torch.linspace(0.3, 1.5, dim, dtype=torch.float64) ** 2
        self.mean = torch.linspace(-1.0, 1.0, dim, dtype=torch.float64)

    def slopes(self, t: torch.Tensor) -> torch.Tensor:
        """k(t): eigenvalues of dv/dx, (B, D)."""
        alpha, d_alpha = self.path.alpha(t[:, None])
        sigma, d_sigma = self.path.sigma(t[:, None])
        return (d_alpha * alpha * self.s2 + d_sigma * sigma) / (alpha**2 * self.s2 + sigma**2)

    def model(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)  # (B, D)
        alpha, d_alpha = self.path.alpha(t[:, None])
        y = (flat - alpha * self.mean) @ self.q  # (B, D) eigen-coordinates
        return (d_alpha * self.mean + (self.slopes(t) * y) @ self.q.T).reshape(x.shape)

    def logp(self, x: torch.Tensor) -> torch.Tensor:
        y = (x.flatten(1) - self.mean) @ self.q
        dim = y.shape[1]
        return -0.5 * (dim * math.log(2 * math.pi) + self.s2.log().sum() + (y**2 / self.s2).sum(1))


def test_likelihood_of_a_correlated_gaussian_converges_to_the_exact_density():
    transport = Transport(PathType.LINEAR)
    data = CorrelatedGaussian(transport)
    points = data.mean + torch.randn(3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    repeats = 400  # each copy of a point gets its own probe
    x = points.repeat_interleave(repeats, 0).reshape(-1, 4, 2, 2)
    result = log_likelihood(data.model, transport, x, atol=1e-8, rtol=1e-8, generator=torch.Generator().manual_seed(0))
    estimates = result.logp.reshape(3, repeats)
    spread = estimates.std(1)
    assert (spread > 0.05).all()  # off-diagonal Jacobian terms: the probe matters here
    # Hutchinson is unbiased: the mean of 400 independent estimates is within 5 standard errors
    error = (estimates.mean(1) - data.logp(points)).abs()
    assert (error < 5 * spread / math.sqrt(repeats)).all(), (error, spread)
    # what a probe with one sign per sample would estimate instead of the trace: far off
    jac = data.q @ torch.diag(data.slopes(torch.tensor([0.5], dtype=torch.float64))[0]) @ data.q.T
    assert (jac.sum() - jac.trace()).abs() > 10 * (5 * spread / math.sqrt(repeats)).max()
