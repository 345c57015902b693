"""Probability-flow ODE samplers: noise -> data (sampling) and data -> noise (encoding).

Fixed-step methods take exactly ``num_steps`` steps (Euler: NFE = num_steps, Heun:
2 * num_steps); adaptive methods (dopri5 and the rest of torchdiffeq's) control the error
with ``atol``/``rtol``. All methods run through torchdiffeq. Time runs from noise (t0) to
data (t1) as in the released code; ``reverse=True`` integrates from data back to noise.
Fixed-step grids can be warped by SD3's time shift (``time_shift`` > 1: more steps near noise,
`trainer.transport.time_grid`); adaptive methods choose their own steps and take no shift.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchdiffeq import odeint

from sampling.guidance import ModelFn
from sampling.result import CountedModel, SampleResult, time_vector
from trainer.transport import Transport, time_grid

Tensor = torch.Tensor

# our name -> (torchdiffeq name, model calls per step)
FIXED_METHODS = {"euler": ("euler", 1), "heun": ("heun2", 2), "midpoint": ("midpoint", 2), "rk4": ("rk4", 4)}
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
ODE_METHODS = (*FIXED_METHODS, *ADAPTIVE_METHODS)


def check_ode_method(method: str) -> str:
    method = method.lower()
    if method not in ODE_METHODS:
        raise ValueError(f"unknown ODE method {method!r}; valid: {', '.join(ODE_METHODS)}")
    return method


def integrate(
    func: Callable[[Tensor, Tensor | tuple[Tensor, ...]], Tensor | tuple[Tensor, ...]],
    state: Tensor | tuple[Tensor, ...],
    t_start: float,
    t_end: float,
    method: str = "dopri5",
    num_steps: int = 50,
    atol: float = 1e-6,
    rtol: float = 1e-3,
    time_shift: float = 1.0,
) -> Tensor | tuple[Tensor, ...]:
    """Integrate d state/dt = func(t, state) from t_start to t_end (either direction).

    Fixed-step methods use a grid of exactly ``num_steps`` steps, uniform or warped by
    ``time_shift`` (in the direction noise -> data); adaptive methods ignore ``num_steps``
    and refuse a shift.
    """
    method = check_ode_method(method)
    if time_shift != 1.0 and method not in FIXED_METHODS:
        raise ValueError(f"a time shift needs a fixed-step method ({', '.join(FIXED_METHODS)}), not {method}")
    ts = torch.tensor([t_start, t_end], dtype=torch.float64)
    lo, hi = min(t_start, t_end), max(t_start, t_end)

    def inside(t: Tensor, y):
        # torchdiffeq's initial-step probe may look past the end (VP is undefined beyond t = 1);
        # only that probe can reach outside, since steps are made to land on t_end (step_t).
        return func(t.clamp(lo, hi), y)

    if method in FIXED_METHODS:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")

        def grid(_f, _y0, t: Tensor) -> Tensor:
            if time_shift == 1.0:
                g = torch.linspace(float(t[0]), float(t[-1]), num_steps + 1, dtype=t.dtype, device=t.device)
            else:  # the noise -> data grid, reversed when integrating data -> noise
                g = time_grid(lo, hi, num_steps, time_shift).to(t)
                g = g if t_start <= t_end else g.flip(0)
            g[0], g[-1] = t[0], t[-1]
            return g

        out = odeint(inside, state, ts, method=FIXED_METHODS[method][0], options={"grid_constructor": grid})
    else:
        options = {"step_t": ts[1:]}
        out = odeint(inside, state, ts, method=method, atol=atol, rtol=rtol, options=options)
    return tuple(o[-1] for o in out) if isinstance(out, tuple) else out[-1]


def sample_ode(
    model_fn: ModelFn,
    transport: Transport,
    x: Tensor,
    method: str = "dopri5",
    num_steps: int = 50,
    atol: float = 1e-6,
    rtol: float = 1e-3,
    reverse: bool = False,
    time_shift: float = 1.0,
) -> SampleResult:
    """Integrate the probability-flow ODE dx/dt = v(x, t) over the transport's interval.

    ``reverse=False``: x is noise at t0, returns data at t1. ``reverse=True``: x is data at t1,
    returns its noise encoding at t0. Released defaults: dopri5, atol 1e-6, rtol 1e-3.
    ``time_shift`` warps a fixed-step grid (module docstring).
    """
    model = CountedModel(model_fn)
    t0, t1 = transport.ode_interval()

    def velocity(t: Tensor, x_t: Tensor) -> Tensor:
        tv = time_vector(t, x_t)
        return transport.velocity(model(x_t, tv), x_t, tv)

    start, end = (t1, t0) if reverse else (t0, t1)
    with torch.no_grad():
        out = integrate(velocity, x, start, end, method, num_steps, atol, rtol, time_shift)
    return SampleResult(out, model.calls)
