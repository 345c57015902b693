"""Fixtures of the sampling job tests: a small SiT export (and a broken twin), a TorchScript
stand-in with the standard Inception file's call interface."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer.export import save_export
from trainer.model import SiT, SiTConfig

TINY = SiTConfig(depth=2, hidden_size=64, num_heads=4, patch_size=2, input_size=8, num_classes=10)


def tiny_sit(seed: int = 0) -> SiT:
    """A small SiT with random non-zero weights everywhere (adaLN-Zero init alone outputs zeros)."""
    torch.manual_seed(seed)
    model = SiT(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> str:
    """Our export of a small SiT for 8x8x4 latents (64 px images with the tiny VAE), 10 classes."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_export(str(path), tiny_sit().state_dict(), TINY, {"step": 0})
    return str(path)


NAN_CLASS = 3


@pytest.fixture(scope="session")
def nan_export(tmp_path_factory) -> str:
    """The tiny SiT with a NaN embedding for class NAN_CLASS: its samples come out NaN."""
    model = tiny_sit()
    with torch.no_grad():
        model.y_embedder.embedding_table.weight[NAN_CLASS] = float("nan")
    path = tmp_path_factory.mktemp("ckpt") / "nan.safetensors"
    save_export(str(path), model.state_dict(), TINY)
    return str(path)


class InceptionStandIn(nn.Module):
    """Same call interface as inception-2015-12-05.pt: uint8-range NCHW in; `return_features=True`
    -> pool features, `no_output_bias=True` -> softmax over 1008 classes. 64 features, not 2048."""

    def __init__(self, features: int = 64):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(3 * 4 * 4, features)
        self.head = nn.Linear(features, 1008)

    def forward(
        self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False, no_output_bias: bool = False
    ) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(img.float() / 255.0, 4).flatten(1)
        features = torch.tanh(self.proj(x * 4 - 2))
        if return_features:
            return features
        logits = F.linear(features, self.head.weight) if no_output_bias else self.head(features)
        return F.softmax(logits, dim=1)


@pytest.fixture(scope="session")
def inception_standin(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inception") / "inception-standin.pt"
    with warnings.catch_warnings():  # the standard file is TorchScript, so the stand-in is too
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(InceptionStandIn()).save(str(path))
    return path
