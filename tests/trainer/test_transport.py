import json

import pytest
import torch

from latents.argtypes import parse_choice
from sampling.gaussian import GaussianData
from sampling.sde import DiffusionForm, diffusion_coefficient
from trainer.transport import (
    LossWeight,
    PathType,
    Prediction,
    Transport,
    make_path,
)


def rows(reference_dir):
    return json.loads((reference_dir / "transport_values.json").read_text())["rows"]


def scalar(v: float) -> torch.Tensor:
    return torch.tensor([v], dtype=torch.float64)


def test_reference_values_to_1e9(reference_dir):
    checked = 0
    for r in rows(reference_dir):
        path = make_path(PathType(r["path"]))
        t, x0, x1, v = scalar(r["t"]), scalar(r["noise_x0"]), scalar(r["data_x1"]), scalar(r["v_model"])
        alpha, d_alpha = path.alpha(t)
        sigma, d_sigma = path.sigma(t)
        x_t, u_t = path.interpolate(t, x0, x1)
        f, g = path.drift(x_t, t)
        got = {
            "alpha": alpha,
            "d_alpha": d_alpha,
            "sigma": sigma,
            "d_sigma": d_sigma,
            "x_t": x_t,
            "u_t": u_t,
            "f": f,
            "g": g,
            "score_from_v_model_at_x_t": path.score_from_velocity(v, x_t, t),
            "noise_from_v_model_at_x_t": path.noise_from_velocity(v, x_t, t),
        }
        for key, value in got.items():
            assert value.item() == pytest.approx(r[key], abs=1e-9, rel=0), (r["path"], r["t"], key)
            checked += 1
        for form, value in r["diffusion_norm1"].items():
            w = diffusion_coefficient(path, t, form, norm=1.0)
            assert w.item() == pytest.approx(value, abs=1e-9, rel=0), (r["path"], r["t"], form)
            checked += 1
    assert checked == 9 * 16


@pytest.mark.parametrize("path_type", list(PathType))
def test_conversions_are_mutually_inverse(path_type):
    path = make_path(path_type)
    gen = torch.Generator().manual_seed(0)
    t = torch.rand(64, generator=gen, dtype=torch.float64) * 0.98 + 0.01
    x = torch.randn(64, 3, generator=gen, dtype=torch.float64)
    s = torch.randn(64, 3, generator=gen, dtype=torch.float64)
    v = path.velocity_from_score(s, x, t)
    torch.testing.assert_close(path.score_from_velocity(v, x, t), s)
    eps = path.noise_from_velocity(v, x, t)
    sigma = path.sigma(t[:, None])[0]
    torch.testing.assert_close(eps, -sigma * s)
    torch.testing.assert_close(path.velocity_from_noise(eps, x, t), v)
    f, g = path.drift(x, t)
    torch.testing.assert_close(v, -f + g * s)


@pytest.mark.parametrize("path_type", list(PathType))
def test_exact_gaussian_velocity_matches_score_relation(path_type):
    transport = Transport(path_type)
    data = GaussianData(transport, torch.tensor([0.3, -1.0], dtype=torch.float64), 0.7)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    x = torch.randn(19, 2, dtype=torch.float64)
    torch.testing.assert_close(transport.path.velocity_from_score(data.score(x, t), x, t), data.velocity(x, t))


def test_default_intervals_follow_released_code():
    assert Transport("Linear", "velocity").train_interval() == (0.0, 1.0)
    assert Transport("GVP", "velocity").ode_interval() == (0.0, 1.0)
    assert Transport("Linear", "score").train_interval() == (1e-3, 1 - 1e-3)
    assert Transport("GVP", "noise").ode_interval() == (1e-3, 1 - 1e-3)
    assert Transport("VP", "velocity").train_interval() == (0.0, 1 - 1e-5)
    assert Transport("VP", "score").ode_interval() == (0.0, 1 - 1e-3)
    assert Transport("VP", train_eps=0.01, sample_eps=0.02).ode_interval() == (0.0, 0.98)


def test_unknown_choices_list_valid_ones_at_the_edge():
    with pytest.raises(ValueError, match="Linear, GVP, VP"):
        parse_choice(PathType, "Cosine")
    with pytest.raises(ValueError, match="velocity, score, noise"):
        parse_choice(Prediction, "x0")
    with pytest.raises(ValueError, match="none, velocity, likelihood"):
        parse_choice(LossWeight, "snr")
    with pytest.raises(ValueError, match="increasing-decreasing"):
        parse_choice(DiffusionForm, "inccreasing-decreasing")
    assert parse_choice(PathType, "linear") is PathType.LINEAR


def test_the_math_takes_members_or_exact_values_only():
    assert Transport("GVP", "noise").path_type is PathType.GVP  # an exact value is the member
    for bad in ({"path_type": "Cosine"}, {"path_type": "linear"}, {"prediction": "x0"}, {"loss_weight": "snr"}):
        with pytest.raises(ValueError):
            Transport(**bad)


def test_time_draws_come_from_the_generator():
    transport = Transport("Linear", "score")
    a = transport.sample_time(1000, torch.Generator().manual_seed(5))
    b = transport.sample_time(1000, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert a.min() >= 1e-3 and a.max() <= 1 - 1e-3


@pytest.mark.parametrize("path_type", list(PathType))
def test_losses_are_zero_at_the_targets(path_type):
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(8, 2, 2, generator=gen, dtype=torch.float64)
    x0 = torch.randn(8, 2, 2, generator=gen, dtype=torch.float64)
    t = torch.rand(8, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    path = make_path(path_type)
    _, u_t = path.interpolate(t, x0, x1)
    sigma = path.sigma(t[:, None, None])[0]
    for pred, target in [("velocity", u_t), ("noise", x0), ("score", -x0 / sigma)]:
        for weight in LossWeight:
            loss = Transport(path_type, pred, weight).loss(target, t, x0, x1)
            assert loss.shape == (8,)
            torch.testing.assert_close(loss, torch.zeros_like(loss), atol=1e-12, rtol=0)


def test_loss_weights():
    gen = torch.Generator().manual_seed(1)
    x1, x0 = (
        torch.randn(5, 3, generator=gen, dtype=torch.float64),
        torch.randn(5, 3, generator=gen, dtype=torch.float64),
    )
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    out = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    path = make_path(PathType.GVP)
    sigma = path.sigma(t)[0]
    g = path.g(t)
    plain = ((out - x0) ** 2).mean(1)
    for weight, w in [("none", 1.0), ("velocity", (g / sigma) ** 2), ("likelihood", g / sigma**2)]:
        got = Transport("GVP", "noise", weight).loss(out, t, x0, x1)
        torch.testing.assert_close(got, w * plain)
    score_loss = Transport("GVP", "score", "likelihood").loss(out, t, x0, x1)
    torch.testing.assert_close(score_loss, g / sigma**2 * ((sigma[:, None] * out + x0) ** 2).mean(1))


@pytest.mark.parametrize("prediction", list(Prediction))
def test_exact_model_minimises_the_expected_loss(prediction):
    """The closed-form Gaussian model beats perturbed versions of itself under the training loss."""
    transport = Transport("Linear", prediction)
    mean = torch.tensor([1.0, -0.5, 0.25, 2.0], dtype=torch.float64)
    data = GaussianData(transport, mean, 0.5)
    gen = torch.Generator().manual_seed(0)
    x1 = mean + 0.5 * torch.randn(200_000, 4, generator=gen, dtype=torch.float64)

    def expected_loss(model):
        return transport.training_losses(model, x1, torch.Generator().manual_seed(1))["loss"].mean().item()

    best = expected_loss(data.model)
    for delta in (0.05, -0.05):
        assert expected_loss(lambda x, t, d=delta: data.model(x, t) + d) > best
        assert expected_loss(lambda x, t, d=delta: data.model(x, t) * (1 + d)) > best


def test_training_losses_deterministic_and_checks_shape():
    transport = Transport()
    x1 = torch.randn(4, 2)
    a = transport.training_losses(lambda x, t: x * t[:, None], x1, torch.Generator().manual_seed(2))
    b = transport.training_losses(lambda x, t: x * t[:, None], x1, torch.Generator().manual_seed(2))
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["t"], b["t"])
    with pytest.raises(ValueError, match="model output shape"):
        transport.training_losses(lambda x, t: x[:, :1], x1)
