"""What sample i is: its class and its randomness, as functions of (seed, i) alone.

Each sample owns a `torch.Generator` seeded from (seed, i) through numpy's SeedSequence (a
hash, so neighbouring seeds and indices give unrelated streams). From it, in this order: the
class label (uniform policy only), the initial noise, then every Brownian increment of the SDE.
Nothing depends on which worker, batch or restart produced the sample.

Class policies:
  uniform   - a label drawn uniformly from [0, num_classes) per sample (the ADM evaluation)
  balanced  - label i mod num_classes: every class equally often (to within one)
  list      - an explicit list of labels, cycled: sample i gets list[i mod len(list)]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch

from latents.argtypes import parse_choice
from sampling.options import SamplingUsageError

Tensor = torch.Tensor


class ClassPolicy(str, Enum):
    UNIFORM = "uniform"
    BALANCED = "balanced"
    LIST = "list"


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed for sample ``index`` of a run seeded with ``seed``."""
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@dataclass(frozen=True)
class SamplePlan:
    """Classes and randomness of every sample of a run."""

    seed: int
    num_samples: int
    num_classes: int
    policy: ClassPolicy = ClassPolicy.UNIFORM
    classes: tuple[int, ...] = ()  # the explicit labels of the "list" policy

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise SamplingUsageError(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.policy is ClassPolicy.LIST:
            if not self.classes:
                raise SamplingUsageError("the 'list' class policy needs --classes")
            bad = [c for c in self.classes if not 0 <= c < self.num_classes]
            if bad:
                raise SamplingUsageError(f"--classes {bad} outside [0, {self.num_classes}) of the checkpoint")
        elif self.classes:
            raise SamplingUsageError(f"--classes is only used with --class-policy list, not {self.policy.value}")

    def generator(self, index: int, device: torch.device | str = "cpu") -> torch.Generator:
        """Sample ``index``'s own generator, freshly seeded."""
        return torch.Generator(device).manual_seed(sample_seed(self.seed, index))

    def start(
        self, indices: Sequence[int], shape: tuple[int, ...], device: torch.device | str = "cpu"
    ) -> tuple[Tensor, Tensor, list[torch.Generator]]:
        """(noise (B, *shape), labels (B,), generators) of the given samples.

        The generators are left positioned after the label and noise draws, ready for the SDE.
        """
        generators, labels, noise = [], [], []
        for i in indices:
            if not 0 <= i < self.num_samples:
                raise IndexError(f"sample {i} outside [0, {self.num_samples})")
            g = self.generator(i, device)
            if self.policy is ClassPolicy.UNIFORM:
                label = int(torch.randint(self.num_classes, (1,), generator=g, device=device))
            elif self.policy is ClassPolicy.BALANCED:
                label = i % self.num_classes
            else:
                label = self.classes[i % len(self.classes)]
            labels.append(label)
            noise.append(torch.randn(shape, generator=g, device=device))
            generators.append(g)
        return torch.stack(noise), torch.tensor(labels, dtype=torch.long, device=device), generators

    def describe(self) -> dict:
        return {
            "seed": self.seed,
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "class_policy": self.policy.value,
            "classes": list(self.classes),
        }


def parse_classes(text: str | None) -> tuple[int, ...]:
    """'207,360,387' -> (207, 360, 387); None or '' -> ()."""
    if not text:
        return ()
    try:
        return tuple(int(c) for c in text.split(","))
    except ValueError:
        raise SamplingUsageError(f"--classes must be comma-separated integers, got {text!r}") from None


def parse_policy(policy: str | None, classes: tuple[int, ...]) -> ClassPolicy:
    """The class policy from the CLI (parsed once here); default: list with --classes, else uniform."""
    if policy:
        try:
            return parse_choice(ClassPolicy, policy)
        except ValueError as err:
            raise SamplingUsageError(f"--class-policy: {err}") from None
    return ClassPolicy.LIST if classes else ClassPolicy.UNIFORM
