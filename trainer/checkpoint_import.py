"""Import released SiT and DiT checkpoints into `trainer.model.SiT`.

Released files are either a plain state dict (the published SiT-XL-2-256x256.pt, DiT-XL-2-*.pt)
or a training checkpoint ``{"model": ..., "ema": ..., "opt": ..., "args": Namespace}``; from the
latter the EMA weights are taken unless ``prefer="model"``. Loading always uses
``weights_only=True`` (argparse.Namespace is the one extra type allowed, for the ``args`` entry).

Our parameter names are the released ones (``pos_embed`` included, a frozen buffer here), so
the import is a checked identity mapping.

DiT checkpoints share the architecture and load the same way, but were trained as DDPM
noise predictors with t * 1000 in the time embedding: loading them reproduces the DiT network,
not a SiT interpolant model.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Mapping

import torch

from trainer.model import SiT


class CheckpointMismatchError(ValueError):
    """The checkpoint's parameters do not match the model's."""


def read_released_state_dict(
    source: str | os.PathLike | Mapping[str, object], prefer: str = "ema"
) -> dict[str, torch.Tensor]:
    """The weights of a released checkpoint (a path or an already loaded object) as a state dict."""
    if prefer not in ("ema", "model"):
        raise ValueError(f"prefer must be one of 'ema', 'model', not {prefer!r}")
    if isinstance(source, Mapping):
        obj = source
    else:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. "Detected pickle protocol 4": the error says enough
            obj = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(f"{source}: expected a state dict or a dict of them, got {type(obj).__name__}")
    if "ema" in obj or "model" in obj:
        order = ("ema", "model") if prefer == "ema" else ("model", "ema")
        obj = next(obj[k] for k in order if k in obj)
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointMismatchError(f"non-tensor entries in the state dict: {bad[:5]}")
    return state


def load_error(err: BaseException) -> str:
    """What a failed weights-only ``torch.load`` means, in a few words and without torch's advice to
    load with ``weights_only=False``: this code never unpickles arbitrary objects."""
    text = " ".join(str(err).split())
    if isinstance(err, CheckpointMismatchError):
        return text
    if "Unsupported global" in text:
        what = text.split("Unsupported global:", 1)[-1].split(" was not")[0].strip(" .")
        return f"it holds Python objects other than tensors ({what}), which are never unpickled here"
    if "zip archive" in text or "central directory" in text or "PytorchStreamReader" in text:
        return "a truncated or damaged torch zip file"
    return f"unreadable as a torch checkpoint ({type(err).__name__})"


def load_released(model: SiT, source: str | os.PathLike | Mapping[str, object], prefer: str = "ema") -> SiT:
    """Load released SiT/DiT weights into ``model`` (in place) and return it.

    Raises `CheckpointMismatchError` naming every missing key, unexpected key and shape mismatch.
    """
    state = read_released_state_dict(source, prefer)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        lines = []
        if missing:
            lines.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if shapes:
            lines.append(f"shape mismatches ({len(shapes)}): " + "; ".join(shapes))
        raise CheckpointMismatchError("checkpoint does not match the model:\n  " + "\n  ".join(lines))
    model.load_state_dict(state, strict=True)
    return model
