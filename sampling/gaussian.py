"""Gaussian data x1 ~ N(m, s^2 I): the exact model for any path and prediction (DESIGN.md §6).

x_t = alpha x1 + sigma x0 is Gaussian with mean alpha m and variance alpha^2 s^2 + sigma^2, and
E[x1 | x_t], E[x0 | x_t] are affine in x_t, so velocity, score and noise are known exactly.
Plugged in as the "model", every sampler must reproduce the data without any training: the
tests rely on it and `sit demo` runs it as a self-check (`gaussian_self_check`).
"""

from __future__ import annotations

import math

import torch

from trainer.transport import Prediction, Transport, expand_like


class GaussianData:
    def __init__(self, transport: Transport, mean: torch.Tensor, std: float):
        self.transport = transport
        self.path = transport.path
        self.mean = mean  # (C, H, W)
        self.std = std

    def marginal(self, t: torch.Tensor, x: torch.Tensor):
        """mean (B, ...) and variance (B, 1, ...) of x_t."""
        t = expand_like(t, x)
        alpha, _ = self.path.alpha(t)
        sigma, _ = self.path.sigma(t)
        return alpha * self.mean, alpha**2 * self.std**2 + sigma**2

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        te = expand_like(t, x)
        alpha, d_alpha = self.path.alpha(te)
        sigma, d_sigma = self.path.sigma(te)
        mu, var = self.marginal(t, x)
        e_x1 = self.mean + alpha * self.std**2 / var * (x - mu)  # E[x1 | x_t]
        e_x0 = sigma / var * (x - mu)  # E[x0 | x_t]
        return d_alpha * e_x1 + d_sigma * e_x0

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        mu, var = self.marginal(t, x)
        return -(x - mu) / var

    def model(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The exact model output for the transport's prediction type."""
        prediction = self.transport.prediction
        if prediction is Prediction.VELOCITY:
            return self.velocity(x, t)
        if prediction is Prediction.SCORE:
            return self.score(x, t)
        sigma, _ = self.path.sigma(expand_like(t, x))
        return -sigma * self.score(x, t)

    def flow_map(self, z: torch.Tensor, t_from: float, t_to: float) -> torch.Tensor:
        """Exact probability-flow map: the monotone affine map between the two marginals."""
        ta = torch.full((z.shape[0],), t_from, dtype=z.dtype)
        tb = torch.full((z.shape[0],), t_to, dtype=z.dtype)
        mu_a, var_a = self.marginal(ta, z)
        mu_b, var_b = self.marginal(tb, z)
        return mu_b + torch.sqrt(var_b / var_a) * (z - mu_a)

    def logp(self, x: torch.Tensor) -> torch.Tensor:
        dim = x[0].numel()
        sq = ((x - self.mean) ** 2).flatten(1).sum(1)
        return -0.5 * dim * math.log(2 * math.pi * self.std**2) - 0.5 * sq / self.std**2


def gaussian_self_check(n: int = 4096, seed: int = 0) -> list[dict]:
    """Run each sampler family on Gaussian data and compare with the analytic answer.

    Returns one row per check: name, NFE, error, tolerance, ok. Float64 on the CPU, seconds.
    """
    from sampling.likelihood import log_likelihood
    from sampling.ode import sample_ode
    from sampling.sde import sample_sde

    mean = torch.linspace(-1.0, 1.0, 16, dtype=torch.float64).reshape(4, 2, 2)
    std = 0.5
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 4, 2, 2, dtype=torch.float64, generator=gen)
    rows = []

    def add(name, nfe, err, tol):
        rows.append({"check": name, "nfe": nfe, "error": err, "tolerance": tol, "ok": err <= tol})

    for path in ("Linear", "GVP", "VP"):
        transport = Transport(path)
        data = GaussianData(transport, mean, std)
        t0, t1 = transport.ode_interval()
        exact = data.flow_map(z[:256], t0, t1)
        out = sample_ode(data.model, transport, z[:256], method="dopri5", atol=1e-8, rtol=1e-8)
        add(f"{path} ODE dopri5: max |x - flow map|", out.nfe, (out.x - exact).abs().max().item(), 1e-4)
        out = sample_ode(data.model, transport, z[:256], method="heun", num_steps=100)
        add(f"{path} ODE Heun 100: max |x - flow map|", out.nfe, (out.x - exact).abs().max().item(), 1e-3)
        sde = sample_sde(data.model, transport, z, diffusion_form="sigma", last_step="none", generator=gen)
        u = (sde.x - mean) / std  # ~ N(0, 1) up to sampling error (5 standard errors) and dt
        err = max(abs(u.mean().item()), abs(u.var().item() - 1))
        add(
            f"{path} SDE Euler-Maruyama 250: |mean|, |var - 1| (std. units)",
            sde.nfe,
            err,
            5 * (2 / u.numel()) ** 0.5 + 0.02,
        )
        x = mean + std * z[:64]
        lik = log_likelihood(data.model, transport, x, atol=1e-8, rtol=1e-8, generator=gen)
        if path != "VP":  # VP's alpha(0) != 0: its ODE likelihood is not the data density
            add(
                f"{path} likelihood: max |logp - exact| (nats)",
                lik.nfe,
                (lik.logp - data.logp(x)).abs().max().item(),
                1e-3,
            )
    return rows
