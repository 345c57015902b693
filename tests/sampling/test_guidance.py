import pytest
import torch

from sampling.guidance import classifier_free_guidance
from sampling.sde import sample_sde
from trainer.model import SiT, SiTConfig
from trainer.transport import Transport


class Recorder:
    """A class-conditional toy model that records each call's batch."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], y.clone()))
        # output depends on the label so cond != uncond; channel c gets a different offset
        return x * 0 + y.float().reshape(-1, 1, 1, 1) * torch.arange(1, 5).reshape(1, 4, 1, 1)


def test_one_batched_forward_with_null_labels():
    model = Recorder()
    y = torch.tensor([3, 7])
    fn = classifier_free_guidance(model, y, scale=4.0, null_class=10)
    out = fn(torch.zeros(2, 4, 2, 2), torch.full((2,), 0.5))
    assert len(model.calls) == 1
    batch, labels = model.calls[0]
    assert batch == 4 and labels.tolist() == [3, 7, 10, 10]
    cond = y.float().reshape(-1, 1, 1, 1) * torch.arange(1, 5).reshape(1, 4, 1, 1)
    uncond = 10 * torch.arange(1, 5).reshape(1, 4, 1, 1).float()
    torch.testing.assert_close(out, (uncond + 4.0 * (cond - uncond)).expand(2, 4, 2, 2))


def test_three_channel_option_leaves_fourth_channel_conditional():
    model = Recorder()
    y = torch.tensor([3])
    out = classifier_free_guidance(model, y, scale=4.0, null_class=10, guided_channels=3)(
        torch.zeros(1, 4, 1, 1), torch.full((1,), 0.5)
    )
    assert out[0, 3].item() == 3 * 4  # conditional value of channel 3
    assert out[0, 0].item() == 10 + 4 * (3 - 10)


def test_scale_one_and_outside_interval_run_only_the_conditional_half():
    model = Recorder()
    y = torch.tensor([3, 7])
    x = torch.zeros(2, 4, 1, 1)
    classifier_free_guidance(model, y, scale=1.0, null_class=10)(x, torch.full((2,), 0.5))
    fn = classifier_free_guidance(model, y, scale=4.0, null_class=10, interval=(0.2, 0.6))
    out_outside = fn(x, torch.full((2,), 0.8))
    out_inside = fn(x, torch.full((2,), 0.4))
    assert [c[0] for c in model.calls] == [2, 2, 4]
    assert torch.equal(out_outside[:, 0, 0, 0], y.float())
    assert not torch.equal(out_inside, out_outside)
    # mixed times within one batch: guided where inside, conditional elsewhere
    mixed = fn(x, torch.tensor([0.4, 0.8]))
    assert torch.equal(mixed[0], out_inside[0]) and torch.equal(mixed[1], out_outside[1])


def test_bad_interval_rejected():
    with pytest.raises(ValueError, match="interval"):
        classifier_free_guidance(Recorder(), torch.tensor([1]), 2.0, 10, interval=(0.7, 0.2))


def test_guided_sde_on_a_small_sit_one_forward_per_step():
    torch.manual_seed(0)
    model = SiT(SiTConfig(depth=1, hidden_size=32, num_heads=2, patch_size=2, input_size=8, num_classes=10)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    forwards = []
    model.register_forward_hook(lambda m, args, out: forwards.append(args[0].shape[0]))
    y = torch.tensor([1, 2, 3])
    fn = classifier_free_guidance(model, y, scale=1.5, null_class=10)
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = sample_sde(fn, Transport(), z, num_steps=20, generator=torch.Generator().manual_seed(0))
    assert out.x.shape == z.shape and torch.isfinite(out.x).all()
    assert out.nfe == 20 and forwards == [6] * 20
