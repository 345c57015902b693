"""Exponential moving average of the weights, sharded exactly like the trained model.

The EMA is a second `SiT` (same names, same initial values) sharded with FSDP2 in float32 by
`trainer.parallelize.shard_like`; each rank updates only its own shard, so the EMA costs one
model's memory divided by the world size and no communication. It is a module, so it can be
run forward (collectively) for preview grids, and gathered into one consolidated state dict
for export. It is `Stateful`: ``state_dict``/``load_state_dict`` hand its sharded weights to the
checkpoint manager under the name "ema", with the same keys as the EMA module's own model state
dict (what checkpoints held before the EMA was an object), so older checkpoints load unchanged.
The decay is configuration, not state.

Update after every optimizer step (DiT/SiT): ema = decay * ema + (1 - decay) * param.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh

from trainer.parallelize import local_tensor, shard_like


class EMA:
    """The EMA model (``module``) and its decay; checkpointed by name through ``state_dict``."""

    def __init__(self, model: nn.Module, mesh: DeviceMesh, decay: float):
        """``model``: the unsharded model right after initialisation (copied before it is sharded)."""
        self.decay = decay
        self.module = shard_like(copy.deepcopy(model), mesh).eval()
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema <- decay * ema + (1 - decay) * model, shard by shard (names must match)."""
        ema_params = dict(self.module.named_parameters())
        ema, new = [], []
        for name, p in model.named_parameters():
            ema.append(local_tensor(ema_params[name]))
            new.append(local_tensor(p.detach()))
        torch._foreach_lerp_(ema, new, 1.0 - self.decay)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The EMA model's output (collective: every rank must call it with its own inputs).

        The root's parameters stay gathered after an FSDP2 forward; they are resharded here so
        that `update` sees the shards again.
        """
        out = self.module(x, t, y)
        self.module.reshard()
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The sharded EMA weights (DTensors), keyed like the model's parameters."""
        return get_model_state_dict(self.module)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        set_model_state_dict(self.module, state)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The consolidated float32 weights on CPU on rank 0, an empty dict elsewhere (a collective)."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.module, options=options)
