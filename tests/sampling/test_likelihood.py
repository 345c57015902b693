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
