import argparse
import datetime

import pytest
import torch

from sampling.guidance import classifier_free_guidance
from trainer.checkpoint_import import CheckpointMismatchError, load_released, read_released_state_dict
from trainer.model import SiT, SiTConfig


@pytest.fixture(scope="module")
def released(reference_dir):
    d = reference_dir / "released_sit_tiny"
    io = torch.load(d / "inputs_outputs.pt", weights_only=True)
    return d / "state_dict.pt", io


def tiny_config(**kw) -> SiTConfig:
    cfg = {"depth": 2, "hidden_size": 64, "num_heads": 4, "patch_size": 2, "input_size": 8, "learn_sigma": True}
    cfg.update(kw)
    return SiTConfig(**cfg)


def test_reproduces_released_forward(released):
    path, io = released
    model = load_released(SiT(tiny_config()), path).eval()
    with torch.no_grad():
        out = model(io["x"], io["t"], io["y"])
    torch.testing.assert_close(out, io["out"], atol=1e-5, rtol=0)


def test_reproduces_released_three_channel_guidance(released):
    path, io = released
    model = load_released(SiT(tiny_config()), path).eval()
    half = io["cfg_x"].shape[0] // 2
    x, t, y = io["cfg_x"][:half], io["cfg_t"][:half], io["cfg_y"][:half]
    assert (io["cfg_y"][half:] == 1000).all()
    fn = classifier_free_guidance(model, y, io["cfg_scale"], null_class=1000, guided_channels=3)
    with torch.no_grad():
        out = fn(x, t)
    # The released call returns both halves; the first half is the guided sample.
    torch.testing.assert_close(out, io["cfg_out_3channel"][:half], atol=1e-5, rtol=0)


def test_default_guidance_guides_all_channels(released):
    path, io = released
    model = load_released(SiT(tiny_config()), path).eval()
    half = io["cfg_x"].shape[0] // 2
    x, t, y = io["cfg_x"][:half], io["cfg_t"][:half], io["cfg_y"][:half]
    scale = io["cfg_scale"]
    with torch.no_grad():
        cond = model(x, t, y)
        uncond = model(x, t, torch.full_like(y, 1000))
        out = classifier_free_guidance(model, y, scale, null_class=1000)(x, t)
    torch.testing.assert_close(out, uncond + scale * (cond - uncond), atol=1e-5, rtol=0)
    # channel 3 is guided too, so it differs from the released 3-channel result
    assert (out[:, 3] - io["cfg_out_3channel"][:half, 3]).abs().max() > 1e-3


def test_training_checkpoint_prefers_ema_and_strips_prefixes(released, tmp_path):
    path, io = released
    sd = torch.load(path, weights_only=True)
    noisy = {k: v + 1 for k, v in sd.items()}
    ckpt = {
        "model": {f"module.{k}": v for k, v in noisy.items()},
        "ema": sd,
        "opt": {},
        "args": argparse.Namespace(model="SiT-XL/2"),
    }
    torch.save(ckpt, tmp_path / "0100000.pt")
    model = load_released(SiT(tiny_config()), tmp_path / "0100000.pt").eval()
    torch.testing.assert_close(model(io["x"], io["t"], io["y"]), io["out"], atol=1e-5, rtol=0)
    raw = load_released(SiT(tiny_config()), tmp_path / "0100000.pt", prefer="model")
    assert torch.equal(raw.pos_embed, noisy["pos_embed"])


def test_mismatch_names_missing_unexpected_and_shapes(released):
    path, _ = released
    sd = read_released_state_dict(path)
    sd.pop("blocks.1.mlp.fc2.bias")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as err:
        load_released(SiT(tiny_config(depth=3, num_classes=999)), sd)
    msg = str(err.value)
    assert "blocks.1.mlp.fc2.bias" in msg and "blocks.2.attn.qkv.weight" in msg  # missing
    assert "extra.weight" in msg  # unexpected
    assert "y_embedder.embedding_table.weight: checkpoint (1001, 64) vs model (1000, 64)" in msg


def test_loading_is_weights_only(tmp_path):
    # Any pickled object outside the tensor allow-list (here a datetime) is refused.
    torch.save({"model": {"w": torch.zeros(1)}, "other": datetime.date(2024, 1, 1)}, tmp_path / "bad.pt")
    with pytest.raises(Exception, match=r"(?i)weights_only|unsupported|global"):
        read_released_state_dict(tmp_path / "bad.pt")
