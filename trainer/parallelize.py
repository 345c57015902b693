"""Everything distributed about the model, in one place: process group, FSDP2, precision, compile.

The model code (`trainer.model`) knows nothing of this module. `parallelize` applies, in order:
activation checkpointing and `torch.compile` per transformer block (both optional), then FSDP2
`fully_shard` per block and at the root. FSDP2 is used at every world size, 1 included, so one
code path trains, checkpoints and resumes everywhere.

Precision policy "bf16": the transformer blocks (all but a fraction of a percent of the FLOPs)
compute in bfloat16 with float32 master weights, optimizer state and gradient reduction; the
root's own layers - patch, time and label embedders and the final layer - stay in float32, so
the time embedding never sees a rounded t. Policy "fp32": float32 everywhere (bitwise-exact
resume tests). TF32 matmuls are on for CUDA.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from trainer.model import SiT


@dataclass
class World:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(backend: str = "auto") -> World:
    """Start (or join) the process group from torchrun's environment; a lone process is rank 0 of 1.

    backend "auto" picks NCCL when CUDA is available, else gloo.
    """
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if backend == "auto":
            backend = "nccl" if cuda else "gloo"
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        if "RANK" in os.environ:  # started by torchrun (or another launcher setting the env:// variables)
            dist.init_process_group(backend)
        else:  # a lone process: a private one-rank group on a free port
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    return World(dist.get_rank(), dist.get_world_size(), local_rank, device, mesh)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def close_world() -> None:
    """Barrier, then tear down (gloo aborts at exit without the barrier)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def parallelize(
    model: SiT,
    mesh: DeviceMesh,
    precision: str = "bf16",
    compile: bool = False,
    activation_checkpointing: bool = False,
) -> SiT:
    """Shard ``model`` in place with FSDP2 (per block, then the root) and return it."""
    if activation_checkpointing:
        # replace forward rather than wrapping the module: parameter names stay the released ones
        for block in model.blocks:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    if compile:
        for block in model.blocks:
            block.compile()
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    block_policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" else fp32
    )
    last = len(model.blocks) - 1
    for i, block in enumerate(model.blocks):
        # the last block's parameters are needed again at once by backward: keep them gathered
        fully_shard(block, mesh=mesh, mp_policy=block_policy, reshard_after_forward=i < last)
    fully_shard(model, mesh=mesh, mp_policy=fp32)
    return model


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 parameter or gradient (a DTensor); plain tensors as they are."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_like(module: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Shard a second copy of the model (the EMA) exactly like `parallelize` does, in float32."""
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    for block in module.blocks:
        fully_shard(block, mesh=mesh, mp_policy=fp32)
    fully_shard(module, mesh=mesh, mp_policy=fp32)
    return module
