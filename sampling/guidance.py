"""Classifier-free guidance (Ho & Salimans 2022) as a model function for the samplers.

The conditional and unconditional halves run in one batched forward; the null class is
``model.config.num_classes`` (1000 for ImageNet). By default every latent channel is guided.
``guided_channels=3`` reproduces the released DiT/SiT, which guide only the first 3 of the 4
channels (the 4th is the conditional output) - needed to match released FID numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Tensor = torch.Tensor
ModelFn = Callable[[Tensor, Tensor], Tensor]  # (x (B, ...), t (B,)) -> model output (B, ...)


def conditional(model: Callable[..., Tensor], y: Tensor) -> ModelFn:
    """The plain class-conditional model function (no guidance)."""
    return lambda x, t: model(x, t, y)


def classifier_free_guidance(
    model: Callable[..., Tensor],
    y: Tensor,
    scale: float,
    null_class: int,
    guided_channels: int | None = None,
    interval: tuple[float, float] = (0.0, 1.0),
) -> ModelFn:
    """Model function returning  uncond + scale * (cond - uncond)  for labels ``y``.

    ``guided_channels``: guide only the first k channels (None: all). ``interval``: guide only
    where lo <= t <= hi; elsewhere (and when scale == 1) only the conditional half is run.
    """
    lo, hi = interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"guidance interval must satisfy 0 <= lo <= hi <= 1, got {interval}")
    y_null = torch.full_like(y, null_class)
    y_both = torch.cat([y, y_null])

    def fn(x: Tensor, t: Tensor) -> Tensor:
        inside = (t >= lo) & (t <= hi)
        if scale == 1.0 or not bool(inside.any()):
            return model(x, t, y)
        out = model(torch.cat([x, x]), torch.cat([t, t]), y_both)  # (2B, C, ...)
        cond, uncond = out.chunk(2)
        k = out.shape[1] if guided_channels is None else guided_channels
        guided = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])
        if not bool(inside.all()):
            mask = inside.reshape(-1, *([1] * (x.dim() - 1)))
            guided = torch.where(mask, guided, cond[:, :k])
        return torch.cat([guided, cond[:, k:]], dim=1)

    return fn
