"""Reverse-SDE samplers (SiT paper section 2.3, in the released code's scaling).

    dX = [v(X, t) + w_t s(X, t)] dt + sqrt(2 w_t) dW,   integrated forward in t (noise -> data).

The paper's w_t is twice this one; the code's scaling is kept so the released diffusion norms
mean the same here. v and s both come from one model evaluation (`Transport.velocity_and_score`),
so Euler-Maruyama makes one model call per step (the released code makes two).

Step counting: ``num_steps`` counts every step that advances time, the last (denoising) step
included. With a last step, num_steps - 1 SDE steps run on [t0, 1 - last_step_size] and the last
step covers the rest; without, num_steps SDE steps run on [t0, 1 - eps]. For a velocity model,
Euler-Maruyama with 250 steps makes exactly 250 model calls; Heun 2 per SDE step + 1.

Time grid: uniform on [t0, t1], or warped by SD3's time shift (``time_shift`` > 1 puts more
steps near noise; `trainer.transport.time_grid`). The last step is unchanged by the shift.

The choices (method, diffusion form, last step) are enum members, parsed from user strings once
at the edge (`sampling.options`); exact values are accepted and turned into members once per call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from enum import Enum

import torch

from sampling.guidance import ModelFn
from sampling.result import CountedModel, SampleResult, time_vector
from trainer.transport import EPS, Path, PathType, Prediction, Transport, expand_like, time_grid

Tensor = torch.Tensor


class DiffusionForm(str, Enum):
    """w_t of the SDE, scaled by the diffusion norm n."""

    CONSTANT = "constant"  # n
    SBDM = "SBDM"  # n * g_t (the score-based diffusion model's own diffusion)
    SIGMA = "sigma"  # n * sigma_t
    LINEAR = "linear"  # n * (1 - t)
    DECREASING = "decreasing"  # 0.25 * (n * cos(pi t) + 1)^2
    INCREASING_DECREASING = "increasing-decreasing"  # n * sin(pi t)^2


class LastStep(str, Enum):
    """Final step from 1 - h to 1 without noise."""

    NONE = "none"
    MEAN = "Mean"  # x + (v + w s) h
    TWEEDIE = "Tweedie"  # E[x1 | x_t] = (x + sigma^2 s) / alpha
    EULER = "Euler"  # x + v h


class SdeMethod(str, Enum):
    EULER = "euler"  # Euler-Maruyama
    HEUN = "heun"  # stochastic Heun as in the released code


def diffusion_function(path: Path, form: DiffusionForm, norm: float = 1.0) -> Callable[[Tensor], Tensor]:
    """t -> w_t (same shape as t) for the given form, chosen once (the sampler calls it every step)."""
    form = DiffusionForm(form)
    if form is DiffusionForm.CONSTANT:
        return lambda t: torch.full_like(t, norm)
    if form is DiffusionForm.SBDM:
        return lambda t: norm * path.g(t)
    if form is DiffusionForm.SIGMA:
        return lambda t: norm * path.sigma(t)[0]
    if form is DiffusionForm.LINEAR:
        return lambda t: norm * (1 - t)
    if form is DiffusionForm.DECREASING:
        return lambda t: 0.25 * (norm * torch.cos(math.pi * t) + 1) ** 2
    return lambda t: norm * torch.sin(math.pi * t) ** 2


def diffusion_coefficient(path: Path, t: Tensor, form: DiffusionForm, norm: float = 1.0) -> Tensor:
    """w_t for the given form (same shape as t)."""
    return diffusion_function(path, form, norm)(t)


def sde_interval(
    transport: Transport, form: DiffusionForm, last_step: LastStep, last_step_size: float
) -> tuple[float, float]:
    """[t0, t1] of the SDE part.

    Differences from the released check_interval, both to avoid its NaNs: SBDM on Linear/GVP
    starts at eps >= 1e-3 (g is infinite at t = 0), and without a last step the SDE stops at
    1 - max(sample_eps, 1e-3) for Linear/GVP (the score from a velocity is 0/0 at t = 1).
    """
    form, last_step = DiffusionForm(form), LastStep(last_step)
    eps = transport.sample_eps
    vp = transport.path_type is PathType.VP
    t0 = 0.0
    if not vp and (form is DiffusionForm.SBDM or transport.prediction is not Prediction.VELOCITY):
        t0 = max(eps, EPS) if form is DiffusionForm.SBDM else eps
    if last_step is not LastStep.NONE:
        if not 0 < last_step_size < 1:
            raise ValueError(f"last_step_size must be in (0, 1), got {last_step_size}")
        t1 = 1 - last_step_size
    else:
        t1 = 1 - (eps if vp else max(eps, EPS))
    if not t0 < t1:
        raise ValueError(f"empty SDE interval [{t0}, {t1}]")
    return t0, t1


def sample_sde(
    model_fn: ModelFn,
    transport: Transport,
    x: Tensor,
    method: SdeMethod = SdeMethod.EULER,
    num_steps: int = 250,
    diffusion_form: DiffusionForm = DiffusionForm.SIGMA,
    diffusion_norm: float = 1.0,
    last_step: LastStep = LastStep.MEAN,
    last_step_size: float = 0.04,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    time_shift: float = 1.0,
) -> SampleResult:
    """Sample from noise ``x`` (at t0) to data. Released defaults: Euler-Maruyama, 250 steps,
    diffusion form ``sigma`` with norm 1, last step ``Mean`` of size 0.04.

    The Brownian increments are drawn from ``generator`` (same generator state, same samples).
    A sequence of generators, one per sample, draws sample b's increments from generator b
    alone, so a sample does not depend on the batch it runs in (the bulk sampler's contract).
    ``time_shift`` warps the SDE steps' grid (module docstring).
    """
    method, last_step = SdeMethod(method), LastStep(last_step)
    if isinstance(generator, Sequence) and len(generator) != x.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]} samples")
    path = transport.path
    t0, t1 = sde_interval(transport, diffusion_form, last_step, last_step_size)
    sde_steps = num_steps - (last_step is not LastStep.NONE)
    if sde_steps < 1:
        raise ValueError(f"num_steps={num_steps} leaves no SDE step")
    model = CountedModel(model_fn)
    diffusion = diffusion_function(path, diffusion_form, diffusion_norm)

    def w(t: Tensor) -> Tensor:
        return expand_like(diffusion(t), x)

    def velocity_score(x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return transport.velocity_and_score(model(x_t, t), x_t, t)

    def sde_drift(x_t: Tensor, t: Tensor) -> Tensor:
        v, s = velocity_score(x_t, t)
        return v + w(t) * s

    def noise() -> Tensor:
        if isinstance(generator, Sequence):
            return torch.stack(
                [torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in generator]
            )
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    grid = time_grid(t0, t1, sde_steps, time_shift)
    # the unshifted step is the released constant (t1 - t0) / n, not a difference of grid points
    sizes = [(t1 - t0) / sde_steps] * sde_steps if time_shift == 1.0 else (grid[1:] - grid[:-1]).tolist()
    with torch.no_grad():
        for i, dt in enumerate(sizes):
            t = time_vector(grid[i], x)
            if method is SdeMethod.EULER:
                x = x + sde_drift(x, t) * dt + torch.sqrt(2 * w(t) * dt) * noise()
            else:
                x_hat = x + torch.sqrt(2 * w(t) * dt) * noise()
                k1 = sde_drift(x_hat, t)
                k2 = sde_drift(x_hat + dt * k1, time_vector(grid[i + 1], x))
                x = x_hat + 0.5 * dt * (k1 + k2)
        x = _last_step(x, time_vector(t1, x), last_step, 1 - t1, velocity_score, w, path)
    return SampleResult(x, model.calls)


def _last_step(x, t, last_step, h, velocity_score, w, path) -> Tensor:
    if last_step is LastStep.NONE:
        return x
    v, s = velocity_score(x, t)
    if last_step is LastStep.MEAN:
        return x + (v + w(t) * s) * h
    if last_step is LastStep.EULER:
        return x + v * h
    alpha, _ = path.alpha(expand_like(t, x))
    sigma, _ = path.sigma(expand_like(t, x))
    return (x + sigma**2 * s) / alpha
