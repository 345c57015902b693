"""SDE samplers on Gaussian data x1 ~ N(m, s^2 I), every path x diffusion form x method.

Tolerances (derived, normalised by s and s^2):
* Sample size: N = 8192 draws of 16 dimensions, n = 131,072 pooled values after subtracting
  the expected per-dimension mean. Standard errors: mean sqrt(v/n) <= 0.0028, variance
  v*sqrt(2/n) <= 0.0039. We allow 5 standard errors.
* Last step: with the default "Mean" last step (h = 0.04, no noise) the output is not N(m, s^2)
  even for an exact SDE: it is the exact marginal at t1 = 1 - h, N(alpha m, alpha^2 s^2 + sigma^2),
  pushed through the last step's map, which is affine for Gaussian data (slope a, so the
  variance is a^2 var(t1)). We compute that target from the closed-form velocity and score; its
  distance from (m, s^2) is the last step's own bias (up to 32% of the variance for the
  constant form) and is not a sampler error.
* Time discretisation: Euler-Maruyama and stochastic Heun are weak order 1; with dt = 0.96/249
  ~= 0.0039 the variance bias measured with 2^20 draws per configuration was at most 0.0105
  (2.7 dt); we allow 5 dt = 0.02 for the variance and 0.005 for the mean.
A factor-2 error in the score conversion, the w_t s drift term or the sqrt(2 w_t) noise moves
the variance by far more than these tolerances (checked by mutation when this was written).
"""

import math

import pytest
import torch

from sampling.gaussian import GaussianData
from sampling.sde import DiffusionForm, LastStep, diffusion_coefficient, sample_sde
from trainer.transport import PathType, Transport, time_grid

MEAN = torch.linspace(-1.0, 1.0, 16, dtype=torch.float64).reshape(4, 2, 2)
STD = 0.5
N = 8192
SE_SIGMAS = 5
DISC_MEAN, DISC_VAR = 0.005, 0.02


def expected_stats(data: GaussianData, form, last_step: LastStep, h: float = 0.04):
    """Mean (per dim) and variance of: exact marginal at t1, then the last step's affine map."""
    transport = data.transport
    t1 = 1 - h if last_step is not LastStep.NONE else 1 - max(transport.sample_eps, 1e-3)
    t = torch.tensor([t1], dtype=torch.float64)
    mu1, var1 = data.marginal(t, MEAN[None])
    alpha, _ = transport.path.alpha(t)
    sigma, _ = transport.path.sigma(t)
    w = diffusion_coefficient(transport.path, t, form)

    def last(x):  # DESIGN.md section 2, written from the formulas, not from the sampler
        v, s = data.velocity(x, t), data.score(x, t)
        if last_step is LastStep.MEAN:
            return x + (v + w * s) * h
        if last_step is LastStep.EULER:
            return x + v * h
        if last_step is LastStep.TWEEDIE:
            return (x + sigma**2 * s) / alpha
        return x

    mean = last(mu1)
    slope = last(mu1 + 1.0) - mean  # affine map: same slope in every dimension
    return mean[0], (slope**2 * var1).flatten()[0].item()


def run(path_type, form, method="euler", last_step=LastStep.MEAN, seed=0):
    transport = Transport(path_type, "velocity")
    data = GaussianData(transport, MEAN, STD)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(N, 4, 2, 2, dtype=torch.float64, generator=gen)
    out = sample_sde(data.model, transport, z, method=method, diffusion_form=form, last_step=last_step, generator=gen)
    return data, out


def check_moments(data, form, last_step, x):
    mean, var = expected_stats(data, form, last_step)
    centred = (x - mean) / STD  # (N, 4, 2, 2)
    n = centred.numel()
    got_var = centred.pow(2).mean().item()
    exp_var = var / STD**2
    tol_mean = SE_SIGMAS * math.sqrt(exp_var / n) + DISC_MEAN
    tol_var = SE_SIGMAS * exp_var * math.sqrt(2 / n) + DISC_VAR
    assert torch.isfinite(x).all()
    assert abs(centred.mean().item()) < tol_mean, ("mean", centred.mean().item(), tol_mean)
    # per-dimension means follow m (catches channel mix-ups that pooled stats would hide)
    assert (centred.mean(0)).abs().max().item() < 4 * tol_mean
    assert abs(got_var - exp_var) < tol_var, ("variance", got_var, exp_var, tol_var)


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("form", list(DiffusionForm))
@pytest.mark.parametrize("path_type", list(PathType))
def test_every_form_on_every_path_samples_the_data(path_type, form, method):
    data, out = run(path_type, form, method)
    check_moments(data, form, LastStep.MEAN, out.x)
    assert out.nfe == (250 if method == "euler" else 2 * 249 + 1)


@pytest.mark.parametrize("last_step", [LastStep.NONE, LastStep.TWEEDIE, LastStep.EULER])
@pytest.mark.parametrize("path_type", list(PathType))
def test_other_last_steps(path_type, last_step):
    data, out = run(path_type, DiffusionForm.SIGMA, last_step=last_step)
    check_moments(data, DiffusionForm.SIGMA, last_step, out.x)
    # Without a last step the SDE runs to t = 0.999, so the result is N(m, s^2) itself.
    if last_step is LastStep.NONE:
        assert abs(((out.x - MEAN) / STD).var().item() - 1) < 0.05


@pytest.mark.parametrize("prediction", ["score", "noise"])
def test_score_and_noise_models(prediction):
    transport = Transport("Linear", prediction)
    data = GaussianData(transport, MEAN, STD)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(N, 4, 2, 2, dtype=torch.float64, generator=gen)
    out = sample_sde(data.model, transport, z, generator=gen)
    check_moments(data, DiffusionForm.SIGMA, LastStep.MEAN, out.x)
    assert out.nfe == 250


def test_velocity_model_one_call_per_euler_step():
    calls = []

    def model(x, t):
        calls.append(float(t[0]))
        return torch.zeros_like(x)

    z = torch.randn(2, 4, 2, 2)
    assert sample_sde(model, Transport(), z, num_steps=250).nfe == 250 == len(calls)
    assert calls[-1] == pytest.approx(0.96)  # the last (Mean) step at 1 - h
    calls.clear()
    assert sample_sde(model, Transport(), z, num_steps=10, last_step="none").nfe == 10 == len(calls)
    calls.clear()
    assert sample_sde(model, Transport(), z, method="heun", num_steps=10).nfe == 19


def test_generator_makes_sampling_reproducible():
    transport = Transport()
    data = GaussianData(transport, MEAN, STD)
    z = torch.randn(4, 4, 2, 2, dtype=torch.float64)
    a = sample_sde(data.model, transport, z, num_steps=20, generator=torch.Generator().manual_seed(1))
    b = sample_sde(data.model, transport, z, num_steps=20, generator=torch.Generator().manual_seed(1))
    c = sample_sde(data.model, transport, z, num_steps=20, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)


def test_unknown_choices_raise():
    # the samplers take members or exact values; user strings are parsed (listing the valid
    # ones) at the edge, sampling.options - see test_sample_units
    z = torch.randn(2, 4)
    with pytest.raises(ValueError, match="DiffusionForm"):
        sample_sde(lambda x, t: x, Transport(), z, diffusion_form="inccreasing-decreasing")
    with pytest.raises(ValueError, match="LastStep"):
        sample_sde(lambda x, t: x, Transport(), z, last_step="Denoise")
    with pytest.raises(ValueError, match="SdeMethod"):
        sample_sde(lambda x, t: x, Transport(), z, method="milstein")


def test_the_diffusion_form_is_chosen_once_not_per_step(monkeypatch):
    import sampling.sde as sde

    chosen = []
    real = sde.diffusion_function
    monkeypatch.setattr(sde, "diffusion_function", lambda *a: chosen.append(a) or real(*a))
    data = GaussianData(Transport(), MEAN, STD)
    sample_sde(data.model, Transport(), torch.randn(4, 4, 2, 2, dtype=torch.float64), num_steps=20)
    assert len(chosen) == 1


def test_time_shift_grid_and_moments():
    times = []
    transport = Transport()
    data = GaussianData(transport, MEAN, STD)

    def model(x, t):
        times.append(float(t[0]))
        return data.model(x, t)

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(N, 4, 2, 2, dtype=torch.float64, generator=gen)
    out = sample_sde(model, transport, z, method="heun", num_steps=250, generator=gen, time_shift=3.0)
    grid = time_grid(0.0, 0.96, 249, 3.0).tolist()
    assert times[0::2][:249] == pytest.approx(grid[:-1], abs=1e-12)  # Heun: 2 calls per step, then the last step
    assert times[-1] == pytest.approx(0.96)
    check_moments(data, DiffusionForm.SIGMA, LastStep.MEAN, out.x)


@pytest.mark.parametrize("path_type", list(PathType))
def test_zero_diffusion_reduces_to_the_ode_with_the_methods_order(path_type):
    """With norm 0 (constant form) the SDE is the probability-flow ODE: Heun must converge at
    second order and Euler-Maruyama at first order to the exact flow map."""
    transport = Transport(path_type)
    data = GaussianData(transport, MEAN, STD)
    z = torch.randn(64, 4, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t1 = 1 - max(transport.sample_eps, 1e-3)
    exact = data.flow_map(z, 0.0, t1)
    err = {}
    for method in ("heun", "euler"):
        for steps in (25, 100):
            x = sample_sde(
                data.model,
                transport,
                z,
                method=method,
                num_steps=steps,
                diffusion_form="constant",
                diffusion_norm=0.0,
                last_step="none",
            ).x
            err[method, steps] = (x - exact).abs().max().item()
    assert err["heun", 100] < 1e-3
    assert err["heun", 25] / err["heun", 100] > 10
    assert 2.5 < err["euler", 25] / err["euler", 100] < 6
