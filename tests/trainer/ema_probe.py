"""Run under torchrun: outputs of the sharded EMA of a run's newest checkpoint on fixed inputs.

    torchrun --nproc_per_node 2 -m tests.trainer.ema_probe RUN_DIR OUT.pt

Every rank runs the FSDP-sharded EMA forward (a collective); rank 0 saves {x, t, y, out}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from trainer.config import config_from_dict
from trainer.parallelize import close_world, init_world
from trainer.train import Trainer


def main(run_dir: str, out: str) -> None:
    config = config_from_dict(json.loads((Path(run_dir) / "config.json").read_text()))
    world = init_world("gloo")
    trainer = Trainer(config, world)
    trainer.restore("auto")
    mc = trainer.model_config
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, mc.in_channels, mc.input_size, mc.input_size, generator=g)
    t = torch.rand(6, generator=g)
    y = torch.arange(6) % mc.num_classes
    output = trainer.ema(x, t, y)
    if world.is_main:
        torch.save({"x": x, "t": t, "y": y, "out": output, "step": trainer.step}, out)
    close_world()


if __name__ == "__main__":
    main(*sys.argv[1:])
