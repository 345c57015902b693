"""Stochastic-interpolant transport: paths, prediction conversions and training losses.

Pure math: no I/O, no torch.distributed. Conventions (DESIGN.md section 2, as in the released
SiT code; the paper writes time the other way round):

* t = 0 is pure noise x0 ~ N(0, I), t = 1 is data x1;  x_t = alpha_t x1 + sigma_t x0.
* Velocity target  u_t = d_alpha_t x1 + d_sigma_t x0.
* Drift decomposition  f = -(d_alpha/alpha) x,  g = (d_alpha/alpha) sigma^2 - sigma d_sigma, so
  the velocity and the score s = grad log p_t relate exactly by  v = -f + g s  (paper eq. 9 in
  its own time direction).

Training options beyond the released recipe (all off by default, which is the released code):

* Time sampling. ``uniform`` (released) or ``logit_normal``: t = sigmoid(u), u ~ N(m, s^2),
  density  p(t) = exp(-(logit(t) - m)^2 / (2 s^2)) / (s sqrt(2 pi) t (1 - t))  (SD3: Esser et
  al. 2024, eq. 19). SD3 writes t = 1 for noise, so its m is -m here; m = 0 is the same in both.
* Time shift s (SD3 section 5.3.2, eq. 23):  t' = s t / (1 + (s - 1) t)  in SD3's convention
  (t = 1 noise). With our t = 1 - t_SD3 this is  t' = t / (s + (1 - s) t): s > 1 moves times
  towards noise (t = 0), s = 1 is the identity, 0 and 1 are fixed. The same warp spaces the
  samplers' time grids (`time_grid`).
* Direction loss: w_dir * mean(1 - cos(v_theta, u_t)), the cosine taken over the channels at each
  latent position (LightningDiT, Yao et al. 2025), added to the MSE of velocity models.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


class PathType(str, Enum):
    LINEAR = "Linear"
    GVP = "GVP"
    VP = "VP"


class Prediction(str, Enum):
    VELOCITY = "velocity"
    SCORE = "score"
    NOISE = "noise"


class LossWeight(str, Enum):
    NONE = "none"
    VELOCITY = "velocity"  # (g / sigma)^2
    LIKELIHOOD = "likelihood"  # g / sigma^2


class TimeSampling(str, Enum):
    UNIFORM = "uniform"  # released: uniform on the training interval
    LOGIT_NORMAL = "logit_normal"  # t = sigmoid(u), u ~ N(m, s^2) (SD3)


def shift_time(t: Tensor, shift: float) -> Tensor:
    """SD3's resolution time shift in our convention (t = 0 noise): t / (shift + (1 - shift) t).

    Esser et al. 2024, eq. 23, write t' = s t / (1 + (s - 1) t) with t = 1 noise; substituting
    t -> 1 - t on both sides gives this form. shift > 1 puts more time near noise.
    """
    return t / (shift + (1 - shift) * t)


def time_grid(t0: float, t1: float, steps: int, shift: float = 1.0) -> Tensor:
    """(steps + 1,) float64 times from t0 to t1: uniform, or the uniform grid on [0, 1] warped by
    `shift_time` and mapped affinely onto [t0, t1] (the end points stay where they are)."""
    if shift == 1.0:
        return torch.linspace(t0, t1, steps + 1, dtype=torch.float64)
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    return t0 + (t1 - t0) * shift_time(u, shift)


def expand_like(t: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against x."""
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1))) if t.dim() == 1 else t


class Path:
    """An interpolation path; subclasses define only `alpha` and `sigma` (value, derivative)."""

    def alpha(self, t: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def interpolate(self, t: Tensor, x0: Tensor, x1: Tensor) -> tuple[Tensor, Tensor]:
        """(x_t, u_t) for t of shape (B,)."""
        t = expand_like(t, x1)
        alpha, d_alpha = self.alpha(t)
        sigma, d_sigma = self.sigma(t)
        return alpha * x1 + sigma * x0, d_alpha * x1 + d_sigma * x0

    def g(self, t: Tensor) -> Tensor:
        """The diffusion factor g = (d_alpha/alpha) sigma^2 - sigma d_sigma (the SBDM diffusion)."""
        alpha, d_alpha = self.alpha(t)
        sigma, d_sigma = self.sigma(t)
        return d_alpha / alpha * sigma**2 - sigma * d_sigma

    def drift(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(f, g): the linear drift f = -(d_alpha/alpha) x and the diffusion factor g."""
        t = expand_like(t, x)
        alpha, d_alpha = self.alpha(t)
        return -(d_alpha / alpha) * x, self.g(t)

    def score_from_velocity(self, v: Tensor, x: Tensor, t: Tensor) -> Tensor:
        # Solve v = -f + g s for s, multiplied through by alpha/d_alpha (finite at t = 0).
        t = expand_like(t, x)
        alpha, d_alpha = self.alpha(t)
        sigma, d_sigma = self.sigma(t)
        r = alpha / d_alpha
        return (r * v - x) / (sigma**2 - r * d_sigma * sigma)

    def noise_from_velocity(self, v: Tensor, x: Tensor, t: Tensor) -> Tensor:
        # eps = -sigma s
        t = expand_like(t, x)
        alpha, d_alpha = self.alpha(t)
        sigma, d_sigma = self.sigma(t)
        r = alpha / d_alpha
        return (r * v - x) / (r * d_sigma - sigma)

    def velocity_from_score(self, s: Tensor, x: Tensor, t: Tensor) -> Tensor:
        f, g = self.drift(x, t)
        return g * s - f

    def score_from_noise(self, eps: Tensor, x: Tensor, t: Tensor) -> Tensor:
        sigma, _ = self.sigma(expand_like(t, x))
        return -eps / sigma

    def velocity_from_noise(self, eps: Tensor, x: Tensor, t: Tensor) -> Tensor:
        return self.velocity_from_score(self.score_from_noise(eps, x, t), x, t)


class LinearPath(Path):
    """alpha = t, sigma = 1 - t (rectified flow)."""

    def alpha(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return t, torch.ones_like(t)

    def sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return 1 - t, -torch.ones_like(t)


class GVPPath(Path):
    """Generalised variance-preserving: alpha = sin(pi t / 2), sigma = cos(pi t / 2)."""

    def alpha(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.sin(t * math.pi / 2), math.pi / 2 * torch.cos(t * math.pi / 2)

    def sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.cos(t * math.pi / 2), -math.pi / 2 * torch.sin(t * math.pi / 2)


class VPPath(Path):
    """Variance-preserving SDE path of score-based models (Song et al. 2021), reversed in time.

    alpha = exp(L), sigma = sqrt(1 - exp(2L)), L(t) = -1/4 (1-t)^2 (b_max - b_min) - 1/2 (1-t) b_min.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.beta_min = beta_min
        self.beta_max = beta_max

    def _log_mean(self, t: Tensor) -> tuple[Tensor, Tensor]:
        # L(t) and dL/dt
        s = 1 - t
        db = self.beta_max - self.beta_min
        return -0.25 * s**2 * db - 0.5 * s * self.beta_min, 0.5 * s * db + 0.5 * self.beta_min

    def alpha(self, t: Tensor) -> tuple[Tensor, Tensor]:
        log_mean, d_log_mean = self._log_mean(t)
        alpha = torch.exp(log_mean)
        return alpha, alpha * d_log_mean

    def sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        log_mean, d_log_mean = self._log_mean(t)
        var = -torch.expm1(2 * log_mean)  # 1 - exp(2L), accurate near t = 1
        sigma = torch.sqrt(var)
        return sigma, -torch.exp(2 * log_mean) * d_log_mean / sigma


def make_path(path: PathType) -> Path:
    return {PathType.LINEAR: LinearPath, PathType.GVP: GVPPath, PathType.VP: VPPath}[path]()


# Released defaults for the time intervals (create_transport / check_interval).
EPS = 1e-3  # train and sample eps of score/noise models on Linear/GVP; sample eps of VP
VP_TRAIN_EPS = 1e-5


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all but the batch dimension: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.dim())))


@dataclass
class Transport:
    """A path, what the model predicts, and the loss weighting.

    ``train_eps``/``sample_eps`` default (None) to the released values: 0 for velocity models on
    Linear/GVP, 1e-3 for score/noise models on Linear/GVP, and 1e-5 (train) / 1e-3 (sample)
    on VP. The enums take members or their exact values; user strings are parsed at the edge
    (`latents.argtypes.parse_choice` in the config and the CLI).
    """

    path_type: PathType = PathType.LINEAR
    prediction: Prediction = Prediction.VELOCITY
    loss_weight: LossWeight = LossWeight.NONE
    train_eps: float | None = None
    sample_eps: float | None = None
    time_sampling: TimeSampling = TimeSampling.UNIFORM  # training times: uniform or logit_normal
    logit_mean: float = 0.0  # m of logit_normal (our convention: m > 0 favours data)
    logit_std: float = 1.0  # s of logit_normal
    time_shift: float = 1.0  # SD3 shift of the training times (1 = none; > 1 towards noise)
    direction_weight: float = 0.0  # weight of the velocity-direction (cosine) loss term (velocity models)

    def __post_init__(self) -> None:
        self.path_type = PathType(self.path_type)
        self.prediction = Prediction(self.prediction)
        self.loss_weight = LossWeight(self.loss_weight)
        self.time_sampling = TimeSampling(self.time_sampling)
        if self.logit_std <= 0 or self.time_shift <= 0 or self.direction_weight < 0:
            raise ValueError(
                f"need logit_std > 0, time_shift > 0 and direction_weight >= 0; got {self.logit_std}, "
                f"{self.time_shift}, {self.direction_weight}"
            )
        if self.direction_weight and self.prediction is not Prediction.VELOCITY:
            raise ValueError(f"the direction loss needs velocity prediction, not {self.prediction.value}")
        self.path = make_path(self.path_type)
        if self.path_type is PathType.VP:
            default_train, default_sample = VP_TRAIN_EPS, EPS
        elif self.prediction is not Prediction.VELOCITY:
            default_train, default_sample = EPS, EPS
        else:
            default_train, default_sample = 0.0, 0.0
        self.train_eps = default_train if self.train_eps is None else float(self.train_eps)
        self.sample_eps = default_sample if self.sample_eps is None else float(self.sample_eps)

    # ---- time intervals ---------------------------------------------------------------------

    def train_interval(self) -> tuple[float, float]:
        """[t0, t1] from which training times are drawn uniformly."""
        return self._interval(self.train_eps)

    def ode_interval(self) -> tuple[float, float]:
        """[t0, t1] the probability-flow ODE is integrated over (noise at t0, data at t1)."""
        return self._interval(self.sample_eps)

    def _interval(self, eps: float) -> tuple[float, float]:
        if self.path_type is PathType.VP:
            return 0.0, 1 - eps
        if self.prediction is not Prediction.VELOCITY:
            return eps, 1 - eps
        return 0.0, 1.0

    # ---- model output -> velocity / score ---------------------------------------------------

    def velocity_and_score(self, out: Tensor, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Both the velocity and the score from one model output (no second model call)."""
        p = self.path
        if self.prediction is Prediction.VELOCITY:
            return out, p.score_from_velocity(out, x, t)
        score = out if self.prediction is Prediction.SCORE else p.score_from_noise(out, x, t)
        return p.velocity_from_score(score, x, t), score

    def velocity(self, out: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """The probability-flow velocity from one model output."""
        if self.prediction is Prediction.VELOCITY:
            return out
        return self.velocity_and_score(out, x, t)[0]

    # ---- training -----------------------------------------------------------------------------

    def sample_time(self, batch: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """(B,) float32 training times on the training interval [t0, t1].

        u in [0, 1] is uniform or logit-normal, then warped by `shift_time` (if shift != 1), then
        mapped to t0 + (t1 - t0) u. Uniform without a shift is the released draw, bit for bit.
        """
        t0, t1 = self.train_interval()
        if self.time_sampling is TimeSampling.UNIFORM:
            u = torch.rand(batch, generator=generator, device=device)
        else:
            normal = torch.randn(batch, generator=generator, device=device)
            u = torch.sigmoid(normal * self.logit_std + self.logit_mean)
        if self.time_shift != 1.0:
            u = shift_time(u, self.time_shift)
        return u * (t1 - t0) + t0

    def loss_terms(self, out: Tensor, t: Tensor, x0: Tensor, x1: Tensor) -> dict[str, Tensor]:
        """Per-sample loss terms (B,) of ``out`` at x_t(t, x0, x1): {"loss": total} and, with a
        direction weight, also {"mse": ..., "direction": 1 - cos(out, u_t) averaged over positions}."""
        mse = self.loss(out, t, x0, x1)
        if not self.direction_weight:
            return {"loss": mse}
        _, u_t = self.path.interpolate(t, x0, x1)
        direction = mean_flat(1 - F.cosine_similarity(out, u_t, dim=1))  # over channels, per position
        return {"loss": mse + self.direction_weight * direction, "mse": mse, "direction": direction}

    def loss(self, out: Tensor, t: Tensor, x0: Tensor, x1: Tensor) -> Tensor:
        """Per-sample MSE loss (B,) of model output ``out`` evaluated at x_t(t, x0, x1)."""
        if self.prediction is Prediction.VELOCITY:
            _, u_t = self.path.interpolate(t, x0, x1)
            return mean_flat((out - u_t) ** 2)
        x_t, _ = self.path.interpolate(t, x0, x1)
        sigma, _ = self.path.sigma(expand_like(t, x_t))
        if self.loss_weight is LossWeight.NONE:
            weight = torch.ones_like(sigma)
        else:
            _, g = self.path.drift(x_t, t)
            weight = (g / sigma) ** 2 if self.loss_weight is LossWeight.VELOCITY else g / sigma**2
        if self.prediction is Prediction.NOISE:
            return mean_flat(weight * (out - x0) ** 2)
        return mean_flat(weight * (sigma * out + x0) ** 2)

    def training_losses(
        self,
        model: Callable[..., Tensor],
        x1: Tensor,
        generator: torch.Generator | None = None,
        **model_kwargs,
    ) -> dict[str, Tensor]:
        """Draw t and x0 from ``generator``, run the model on x_t, return per-sample losses.

        Returns {"loss": (B,), "t": (B,), "pred": model output} (plus "mse" and "direction"
        with a direction weight, see `loss_terms`), losses and t in float32.

        Time, noise, the interpolation and the loss are computed in float32 whatever the data's
        or the model's dtype: in bfloat16 a t near 1 rounds to 1.0, where sigma = 0 and the VP
        velocity target and the score/noise weights are infinite. (The model may compute in a
        lower precision; its output is promoted to float32 for the loss.)
        """
        x1 = x1.float()
        t = self.sample_time(x1.shape[0], generator, x1.device)  # (B,) float32
        x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=torch.float32)
        x_t, _ = self.path.interpolate(t, x0, x1)
        out = model(x_t, t, **model_kwargs)
        if out.shape != x1.shape:
            raise ValueError(f"model output shape {tuple(out.shape)} != data shape {tuple(x1.shape)}")
        return {**self.loss_terms(out.float(), t, x0, x1), "t": t, "pred": out}
