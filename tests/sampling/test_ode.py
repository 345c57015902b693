"""Probability-flow ODE on Gaussian data, where the exact flow map is known (DESIGN.md §6)."""

import pytest
import torch

from sampling.gaussian import GaussianData
from sampling.ode import ODE_METHODS, sample_ode
from trainer.transport import PathType, Prediction, Transport, time_grid

MEAN = torch.linspace(-1.0, 1.0, 16, dtype=torch.float64).reshape(4, 2, 2)
STD = 0.5


def noise(n: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 4, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("path_type", [PathType.LINEAR, PathType.GVP])
def test_adaptive_velocity_ode_maps_noise_to_m_plus_s_z(path_type):
    transport = Transport(path_type, "velocity")
    data = GaussianData(transport, MEAN, STD)
    z = noise()
    out = sample_ode(data.model, transport, z, method="dopri5", atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(out.x, MEAN + STD * z, atol=1e-4, rtol=0)


@pytest.mark.parametrize("prediction", list(Prediction))
@pytest.mark.parametrize("path_type", list(PathType))
def test_adaptive_ode_is_the_exact_flow_map(path_type, prediction):
    """Every path and prediction: the exact affine map between the interval's end marginals
    (for VP, alpha(0) != 0, so this is not m + s z)."""
    transport = Transport(path_type, prediction)
    data = GaussianData(transport, MEAN, STD)
    z = noise()
    t0, t1 = transport.ode_interval()
    out = sample_ode(data.model, transport, z, method="dopri5", atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(out.x, data.flow_map(z, t0, t1), atol=1e-4, rtol=0)
    back = sample_ode(data.model, transport, out.x, method="dopri5", atol=1e-8, rtol=1e-8, reverse=True)
    torch.testing.assert_close(back.x, z, atol=1e-4, rtol=0)


@pytest.mark.parametrize("path_type", list(PathType))
def test_heun_100_steps_within_1e3(path_type):
    transport = Transport(path_type)
    data = GaussianData(transport, MEAN, STD)
    z = noise()
    t0, t1 = transport.ode_interval()
    out = sample_ode(data.model, transport, z, method="heun", num_steps=100)
    assert out.nfe == 200
    torch.testing.assert_close(out.x, data.flow_map(z, t0, t1), atol=1e-3, rtol=0)
    # Heun is second order: 4x the steps cut the error by ~16x; Euler is first order (~4x).
    err = {}
    for method in ("heun", "euler"):
        for steps in (25, 100):
            x = sample_ode(data.model, transport, z, method=method, num_steps=steps).x
            err[method, steps] = (x - data.flow_map(z, t0, t1)).abs().max().item()
    assert err["heun", 25] / err["heun", 100] > 10
    assert 2.5 < err["euler", 25] / err["euler", 100] < 6


@pytest.mark.parametrize("method,per_step", [("euler", 1), ("heun", 2), ("midpoint", 2), ("rk4", 4)])
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_fixed_steps_make_exactly_the_requested_steps(method, per_step, steps):
    times = []

    def model(x, t):
        times.append(float(t[0]))
        return -x

    transport = Transport()
    out = sample_ode(model, transport, noise(4), method=method, num_steps=steps)
    assert out.nfe == steps * per_step == len(times)
    assert min(times) == 0.0 and max(times) <= 1.0
    if method == "euler":  # evaluated exactly on the uniform grid's left ends
        assert times == pytest.approx([i / steps for i in range(steps)], abs=1e-12)


def test_reverse_integrates_from_data_to_noise():
    times = []

    def model(x, t):
        times.append(float(t[0]))
        return torch.zeros_like(x)

    sample_ode(model, Transport(), noise(2), method="euler", num_steps=4, reverse=True)
    assert times == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match="dopri5"):
        sample_ode(lambda x, t: x, Transport(), noise(2), method="rk45")
    assert {"euler", "heun", "dopri5", "dopri8", "bosh3"} <= set(ODE_METHODS)


def test_time_shift_warps_the_fixed_grid_both_ways():
    times = []

    def model(x, t):
        times.append(float(t[0]))
        return torch.zeros_like(x)

    grid = time_grid(0.0, 1.0, 5, 3.0).tolist()
    sample_ode(model, Transport(), noise(2), method="euler", num_steps=5, time_shift=3.0)
    assert times == pytest.approx(grid[:-1], abs=1e-12)  # left ends of SD3's shifted grid
    assert grid[1] < 0.1  # the first step is short: the shift puts steps near noise (t = 0)
    times.clear()
    sample_ode(model, Transport(), noise(2), method="euler", num_steps=5, reverse=True, time_shift=3.0)
    assert times == pytest.approx(grid[::-1][:-1], abs=1e-12)


def test_time_shift_keeps_the_flow_map():
    transport = Transport()
    data = GaussianData(transport, MEAN, STD)
    z = noise()
    out = sample_ode(data.model, transport, z, method="heun", num_steps=100, time_shift=3.0)
    torch.testing.assert_close(out.x, data.flow_map(z, 0.0, 1.0), atol=1e-3, rtol=0)


def test_time_shift_needs_fixed_steps():
    with pytest.raises(ValueError, match="fixed-step"):
        sample_ode(lambda x, t: x, Transport(), noise(2), method="dopri5", time_shift=2.0)


def test_sampler_options_take_the_time_shift_from_the_flag_or_the_export():
    from sampling.options import Mode, SamplerOptions, SamplingUsageError

    trained = {"path_type": "Linear", "prediction": "velocity", "sample_eps": -1, "sample_time_shift": 3.0}
    assert SamplerOptions().with_training_transport(trained).time_shift == 3.0
    assert SamplerOptions(time_shift=1.5).with_training_transport(trained).time_shift == 1.5  # the flag wins
    assert SamplerOptions().with_training_transport(None).time_shift == 1.0  # released checkpoints: no shift
    adaptive = SamplerOptions(Mode.ODE, "dopri5", 50)
    assert adaptive.with_training_transport(trained).time_shift == 1.0  # adaptive steps: no grid to shift
    with pytest.raises(SamplingUsageError, match="--time-shift needs fixed steps"):
        SamplerOptions(Mode.ODE, "dopri5", 50, time_shift=2.0)
    with pytest.raises(SamplingUsageError, match="--time-shift must be > 0"):
        SamplerOptions(time_shift=0.0)
