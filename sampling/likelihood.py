"""Log-likelihood by the probability-flow ODE (instantaneous change of variables).

Integrating dx/dt = v(x, t) from data (t1) back to noise (t0):

    log p_data(x) = log N(x_t0; 0, I) - integral_{t0}^{t1} div v(x_t, t) dt.

The divergence is estimated with Hutchinson's trick, eps^T (dv/dx) eps, using one Rademacher
probe per sample drawn once per solve (FFJORD), so the ODE stays deterministic for the adaptive
solver. Bits per dimension are -log p / (D ln 2) of the latent itself (no dequantisation term).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sampling.guidance import ModelFn
from sampling.ode import integrate
from sampling.result import CountedModel, time_vector
from trainer.transport import Transport

Tensor = torch.Tensor


@dataclass
class LikelihoodResult:
    logp: Tensor  # (B,) log-likelihood in nats
    bits_per_dim: Tensor  # (B,)
    noise: Tensor  # (B, ...) the ODE encoding of x at t0
    nfe: int


def standard_normal_logp(z: Tensor) -> Tensor:
    """log N(z; 0, I) per sample: (B, ...) -> (B,)."""
    dim = z[0].numel()
    return -0.5 * dim * math.log(2 * math.pi) - 0.5 * z.flatten(1).pow(2).sum(1)


def log_likelihood(
    model_fn: ModelFn,
    transport: Transport,
    x: Tensor,
    method: str = "dopri5",
    num_steps: int = 50,
    atol: float = 1e-6,
    rtol: float = 1e-3,
    generator: torch.Generator | None = None,
) -> LikelihoodResult:
    """Log-likelihood of data ``x`` (B, ...) under the model's probability-flow ODE."""
    model = CountedModel(model_fn)
    probe = torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
    t0, t1 = transport.ode_interval()

    def dynamics(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x_t, _ = state
        tv = time_vector(t, x_t)
        with torch.enable_grad():
            x_t = x_t.detach().requires_grad_(True)
            v = transport.velocity(model(x_t, tv), x_t, tv)
            (vjp,) = torch.autograd.grad((v * probe).sum(), x_t)
        divergence = (vjp * probe).flatten(1).sum(1)  # (B,)
        return v.detach(), divergence

    zero = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    noise, div_integral = integrate(dynamics, (x, zero), t1, t0, method, num_steps, atol, rtol)
    # div_integral = integral_{t1}^{t0} div v dt = -integral_{t0}^{t1} div v dt
    logp = standard_normal_logp(noise) + div_integral
    bpd = -logp / (x[0].numel() * math.log(2))
    return LikelihoodResult(logp.detach(), bpd.detach(), noise.detach(), model.calls)
