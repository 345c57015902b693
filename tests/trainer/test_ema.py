"""The EMA: its update formula on known numbers, and its state handed to the checkpoint manager by name
(in the layout checkpoints had before the EMA was a `Stateful` object, so those still load)."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from trainer.checkpoint import CheckpointManager, step_folder
from trainer.ema import EMA
from trainer.model import SiT, SiTConfig
from trainer.parallelize import close_world, init_world, local_tensor, parallelize

CONFIG = SiTConfig(depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=4, num_classes=3)
DECAY = 0.9999


@pytest.fixture
def world():
    world = init_world("gloo")  # this process alone: rank 0 of 1
    yield world
    close_world()


def _filled(value: float) -> SiT:
    model = SiT(CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return model


def _values(ema: EMA) -> torch.Tensor:
    """The EMA's parameters (not the frozen sin-cos position buffer) as one vector."""
    return torch.cat([local_tensor(p).flatten() for p in ema.module.parameters()])


def test_update_is_decay_times_ema_plus_one_minus_decay_times_param(world):
    """ema = d * ema + (1 - d) * param, d = 0.9999: from ema 2 and param 1, one step gives 1.9999 and two
    give 1 + 0.9999^2 = 1.99980001 (swapping d and 1 - d would give 1.0001, then 1.00000001)."""
    model = _filled(2.0)
    ema = EMA(model, world.mesh, DECAY)  # a copy: every weight 2
    trained = parallelize(model, world.mesh, "fp32")
    with torch.no_grad():
        for p in trained.parameters():
            local_tensor(p).fill_(1.0)
    ema.update(trained)
    values = _values(ema)
    torch.testing.assert_close(values, torch.full_like(values, 1.9999), rtol=0, atol=1e-6)
    ema.update(trained)
    values = _values(ema)
    torch.testing.assert_close(values, torch.full_like(values, 1.99980001), rtol=0, atol=1e-6)


def test_state_goes_through_the_checkpoint_manager_by_name(world, tmp_path):
    ema = EMA(_filled(0.5), world.mesh, DECAY)
    keys = dict(get_model_state_dict(ema.module))
    assert ema.state_dict().keys() == keys.keys() == SiT(CONFIG).state_dict().keys()

    manager = CheckpointManager(str(tmp_path / "ckpt"))
    manager.save(1, {"ema": ema}, {"step": 1})
    # the layout before EMA.state_dict existed: the EMA module's model state dict under "ema"
    manager.save(2, {"ema": get_model_state_dict(ema.module)}, {"step": 2})
    for step in (1, 2):
        other = EMA(_filled(-1.0), world.mesh, DECAY)
        assert manager.load(step_folder(manager.url, step), {"ema": other}) == {"step": step}
        assert torch.equal(_values(other), _values(ema))
