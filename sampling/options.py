"""Sampler options: one dataclass, parsed once from the command line, run on a batch of samples.

Every choice of `sampling/` is here: ODE or SDE, the method and its steps, the SDE's diffusion
form and norm, the last step and its size, classifier-free guidance (scale, 3 channels as the
released models or all, the interval of t where it applies), the transport the model was
trained with, the time shift of the step grid, and the precision of the model's forward.
Strings become enums here, at the edge; the samplers receive the parsed values.

`run_sampler` turns noise, labels and per-sample generators into latents. Everything random
comes from the generators, one per sample, so a sample does not depend on the batch it runs in.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from enum import Enum

import torch

from latents.argtypes import parse_choice
from sampling.guidance import classifier_free_guidance, conditional
from sampling.ode import ADAPTIVE_METHODS, FIXED_METHODS, check_ode_method, sample_ode
from sampling.result import SampleResult
from sampling.sde import DiffusionForm, LastStep, SdeMethod, sample_sde
from trainer.transport import PathType, Prediction, Transport

Tensor = torch.Tensor


class SamplingUsageError(ValueError):
    """A `sit sample` flag value that cannot be used; the message names the flag."""


class Mode(str, Enum):
    ODE = "ODE"
    SDE = "SDE"


class Precision(str, Enum):
    FP32 = "fp32"
    BF16 = "bf16"  # autocast of the model's forward; the integrator stays in float32


# Smallest number of rows a model forward runs on. Small matrix products take other kernel paths
# (on CPU below about 12 rows, depending on the thread count), whose rounding differs: padding
# every forward to at least this many rows keeps a sample's bits independent of its batch size.
MIN_FORWARD_ROWS = 16


@dataclass(frozen=True)
class SamplerOptions:
    """How to turn noise into latents (released defaults: SDE, Euler-Maruyama, 250 steps)."""

    mode: Mode = Mode.SDE  # probability-flow ODE or reverse SDE
    method: str = "euler"  # SDE: euler | heun; ODE: euler, heun, midpoint, rk4 or an adaptive one (dopri5, ...)
    num_steps: int = 250  # SDE: steps incl. the last step; fixed-step ODE: steps (adaptive ODE: unused)
    diffusion_form: DiffusionForm = DiffusionForm.SIGMA  # SDE diffusion w_t (released scaling)
    diffusion_norm: float = 1.0  # SDE diffusion norm n
    last_step: LastStep = LastStep.MEAN  # SDE final noiseless step
    last_step_size: float = 0.04  # SDE final step size
    atol: float = 1e-6  # adaptive ODE absolute tolerance
    rtol: float = 1e-3  # adaptive ODE relative tolerance
    cfg_scale: float = 1.0  # classifier-free guidance scale (1: no guidance, half the forwards)
    guided_channels: int | None = None  # None: all latent channels; 3: as the released DiT/SiT
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # guide only for t in [lo, hi]
    path_type: PathType | None = None  # the model's transport; None: the export's, else Linear
    prediction: Prediction | None = None  # None: the export's, else velocity
    sample_eps: float | None = None  # None: the export's, else the transport's released default
    precision: Precision = Precision.FP32  # model forward precision
    time_shift: float | None = None  # SD3 shift of the step grid (> 1: more steps near noise); None: export's, else 1

    def __post_init__(self) -> None:
        try:
            if self.mode is Mode.SDE:
                parse_choice(SdeMethod, self.method)
            else:
                check_ode_method(self.method)
        except ValueError as err:
            raise SamplingUsageError(f"--method: {err}") from None
        if self.num_steps < 1:
            raise SamplingUsageError(f"--steps must be >= 1, got {self.num_steps}")
        if self.time_shift is not None and not self.time_shift > 0:
            raise SamplingUsageError(f"--time-shift must be > 0, got {self.time_shift}")
        if self.adaptive and self.time_shift not in (None, 1.0):
            raise SamplingUsageError(
                f"--time-shift needs fixed steps; ODE method {self.method} is adaptive (use euler, heun, midpoint, rk4)"
            )
        if self.cfg_scale < 1.0:
            raise SamplingUsageError(f"--cfg-scale must be >= 1 (1 = no guidance), got {self.cfg_scale}")
        lo, hi = self.guidance_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise SamplingUsageError(f"--guidance-interval must satisfy 0 <= lo <= hi <= 1, got {lo} {hi}")

    @property
    def adaptive(self) -> bool:
        """Adaptive ODE steps are chosen from the whole batch's error: samples depend on their batch."""
        return self.mode is Mode.ODE and self.method.lower() in ADAPTIVE_METHODS

    def transport(self) -> Transport:
        return Transport(
            self.path_type or PathType.LINEAR, self.prediction or Prediction.VELOCITY, sample_eps=self.sample_eps
        )

    def with_training_transport(self, trained: dict | None) -> SamplerOptions:
        """Fill the transport fields left unset from the one the model was trained with.

        ``trained`` is an export's ``extra["transport"]`` (path_type, prediction, sample_eps with
        -1 for the default, sample_time_shift); None (a released checkpoint): Linear, velocity,
        no shift, as released. An adaptive ODE keeps no shift.
        """
        trained = trained or {}
        eps = trained.get("sample_eps")
        shift = self.time_shift
        if shift is None:
            shift = 1.0 if self.adaptive else float(trained.get("sample_time_shift", 1.0))
        return dataclasses.replace(
            self,
            path_type=self.path_type or parse_choice(PathType, trained.get("path_type", PathType.LINEAR)),
            prediction=self.prediction or parse_choice(Prediction, trained.get("prediction", Prediction.VELOCITY)),
            sample_eps=self.sample_eps
            if self.sample_eps is not None
            else (eps if eps is not None and eps >= 0 else None),
            time_shift=shift,
        )

    def nfe_per_sample(self) -> int | None:
        """Model calls per sample (a guided call counts once); None for adaptive ODE methods."""
        if self.mode is Mode.SDE:
            per_step = 1 if parse_choice(SdeMethod, self.method) is SdeMethod.EULER else 2
            sde_steps = self.num_steps - (self.last_step is not LastStep.NONE)
            return per_step * sde_steps + (self.last_step is not LastStep.NONE)
        if self.adaptive:
            return None
        return FIXED_METHODS[self.method.lower()][1] * self.num_steps

    def describe(self) -> dict:
        """JSON-ready values (enums as their strings), for the run description."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.value if isinstance(v, Enum) else list(v) if isinstance(v, tuple) else v
        return out


def sampler_options(args: argparse.Namespace) -> SamplerOptions:
    """Parse the sampler flags (`sampling.commands`) once; `SamplingUsageError` names a bad one."""
    try:
        return _sampler_options(args)
    except SamplingUsageError:
        raise
    except ValueError as err:  # an unknown choice: parse_choice lists the valid ones
        raise SamplingUsageError(str(err)) from None


def _sampler_options(args: argparse.Namespace) -> SamplerOptions:
    mode = parse_choice(Mode, args.mode)
    method = args.method or ("euler" if mode is Mode.SDE else "dopri5")
    steps = args.steps or (250 if mode is Mode.SDE else 50)
    if args.guided_channels == "all":
        guided = None
    elif args.guided_channels.isdigit() and int(args.guided_channels) > 0:
        guided = int(args.guided_channels)
    else:
        raise SamplingUsageError(f"--guided-channels must be 'all' or a positive count, got {args.guided_channels!r}")
    return SamplerOptions(
        mode=mode,
        method=method.lower(),
        num_steps=steps,
        diffusion_form=parse_choice(DiffusionForm, args.diffusion_form),
        diffusion_norm=args.diffusion_norm,
        last_step=parse_choice(LastStep, args.last_step),
        last_step_size=args.last_step_size,
        atol=args.atol,
        rtol=args.rtol,
        cfg_scale=args.cfg_scale,
        guided_channels=guided,
        guidance_interval=tuple(args.guidance_interval),
        path_type=parse_choice(PathType, args.path_type) if args.path_type else None,
        prediction=parse_choice(Prediction, args.prediction) if args.prediction else None,
        sample_eps=args.sample_eps,
        precision=parse_choice(Precision, args.precision),
        time_shift=args.time_shift,
    )


class PaddedForward:
    """The model's forward, run on at least `MIN_FORWARD_ROWS` rows (extra rows repeat row 0).

    Also applies the precision policy (bf16 autocast) and returns float32.
    """

    def __init__(self, model: torch.nn.Module, precision: Precision):
        self.model = model
        self.precision = precision

    def __call__(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        n = x.shape[0]
        if n < MIN_FORWARD_ROWS:
            pad = MIN_FORWARD_ROWS - n
            x = torch.cat([x, x[:1].expand(pad, *x.shape[1:])])
            t = torch.cat([t, t[:1].expand(pad)])
            y = torch.cat([y, y[:1].expand(pad)])
        if self.precision is Precision.BF16:
            autocast = torch.autocast(x.device.type, dtype=torch.bfloat16)
        else:
            autocast = nullcontext()
        with autocast:
            out = self.model(x, t, y)
        return out[:n].float()


def run_sampler(
    model: torch.nn.Module,
    options: SamplerOptions,
    noise: Tensor,
    labels: Tensor,
    generators: Sequence[torch.Generator],
) -> SampleResult:
    """Latents (B, C, H, W) from ``noise`` (B, C, H, W) at t0 for ``labels`` (B,).

    ``generators`` (one per sample) draw the SDE's Brownian increments; the ODE uses none.
    """
    forward = PaddedForward(model, options.precision)
    if options.cfg_scale == 1.0:
        fn = conditional(forward, labels)
    else:
        null_class = model.config.num_classes
        fn = classifier_free_guidance(
            forward, labels, options.cfg_scale, null_class, options.guided_channels, options.guidance_interval
        )
    transport = options.transport()
    shift = options.time_shift or 1.0
    if options.mode is Mode.ODE:
        return sample_ode(
            fn, transport, noise, options.method, options.num_steps, options.atol, options.rtol, time_shift=shift
        )
    return sample_sde(
        fn,
        transport,
        noise,
        options.method,
        options.num_steps,
        options.diffusion_form,
        options.diffusion_norm,
        options.last_step,
        options.last_step_size,
        generator=list(generators),
        time_shift=shift,
    )
