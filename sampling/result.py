"""What every sampler returns, and the model-call counter behind its NFE."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sampling.guidance import ModelFn

Tensor = torch.Tensor


@dataclass
class SampleResult:
    """Final state of a sampler run.

    x: the samples (data side for sampling, noise side for encoding).
    nfe: number of model-function calls made (a guided call counts once, even though it
        runs a doubled batch).
    """

    x: Tensor
    nfe: int


class CountedModel:
    """Wraps a model function and counts its calls (the NFE)."""

    def __init__(self, fn: ModelFn):
        self.fn = fn
        self.calls = 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        return self.fn(x, t)


def time_vector(t: float | Tensor, x: Tensor) -> Tensor:
    """A scalar time broadcast to a (B,) tensor in x's dtype and device."""
    return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)
