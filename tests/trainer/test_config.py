"""Training config: presets, files, overrides, unknown keys, dry run, dataset checks."""

from __future__ import annotations

import json

import pytest

from cluster.cli import main as sit
from tests.trainer.conftest import tiny_config, write_toy_dataset
from trainer.config import PRESETS, ConfigError, TrainConfig, config_from_dict, preset, resolve
from trainer.metrics import forward_macs
from trainer.model import sit_config
from trainer.train import DatasetMismatchError, train


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_are_valid(name):
    config = preset(name).validate()
    assert config_from_dict(config.to_dict()) == config  # config.json round-trips


def test_paper_defaults():
    c = preset("sit-xl2-256")
    assert (c.data.global_batch_size, c.optim.lr, c.optim.weight_decay, c.optim.warmup_steps) == (256, 1e-4, 0, 0)
    assert (c.optim.ema_decay, c.model.class_dropout_prob) == (0.9999, 0.1)
    assert (c.transport.path_type, c.transport.prediction, c.model.name) == ("Linear", "velocity", "SiT-XL/2")
    assert preset("sit-xl2-512").model.input_size == 64


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"optim": {"lr": 3e-4, "warmup_steps": 10}, "transport": {"path_type": "VP"}}))
    c = resolve("sit-b2-256", str(path), ["optim.lr=2e-4", "parallel.compile=true", "total_steps=1_000"])
    assert (c.optim.lr, c.optim.warmup_steps, c.parallel.compile, c.total_steps) == (2e-4, 10, True, 1000)
    assert c.transport.build().path_type.value == "VP"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr'; valid keys here: lr, weight_decay"),
        ("nope=1", "valid keys here: run_dir, total_steps"),
        ("optim.lr=fast", "optim.lr: expected float"),
        ("total_steps=1.5", "total_steps: expected int"),
        ("transport.path_type=Curved", "valid: Linear, GVP, VP"),
        ("parallel.precision=fp16", "valid: bf16, fp32"),
        ("model.name=SiT-M/3", "valid: custom, SiT-S/1, SiT-S/2"),
        ("optim", "not KEY=VALUE"),
        ("optim=3", "is a section"),
        ("model.mlp=relu", "model: unknown MlpKind 'relu'; valid: gelu, swiglu"),
        ("model.norm=batchnorm", "valid: layernorm, rmsnorm"),
        ("transport.time_sampling=beta", "valid: uniform, logit_normal"),
        ("transport.time_shift=0", "time_shift > 0"),
        ("transport.sample_time_shift=-1", "sample_time_shift must be > 0"),
        ("transport.logit_std=0", "logit_std > 0"),
        ("transport.direction_weight=-1", "direction_weight >= 0"),
    ],
)
def test_bad_keys_and_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        resolve("sit-b2-256", None, [override])


def test_dry_run_prints_the_resolved_config(capsys):
    assert sit(["train", "--preset", "tiny-cpu", "--data", "s3://b/ds", "--set", "optim.lr=5e-4", "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["data"]["url"] == "s3://b/ds" and printed["optim"]["lr"] == 5e-4
    assert config_from_dict(printed) == resolve("tiny-cpu", None, ["data.url=s3://b/ds", "optim.lr=5e-4"])


def test_flop_model_matches_the_papers_figure():
    assert forward_macs(sit_config("SiT-XL/2", input_size=32)) / 1e9 == pytest.approx(118.6, abs=0.1)
    assert forward_macs(sit_config("SiT-XL/2", input_size=64)) / 1e9 == pytest.approx(524.6, abs=0.5)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"input_size": 16}, r"latent shape \(C, H, W\) \[4, 8, 8\] in the dataset, \[4, 16, 16\] in the model"),
        ({"num_classes": 1000}, "num_classes 10 in the dataset, 1000 in the model"),
    ],
)
def test_mismatched_dataset_is_refused_naming_both_values(tmp_path, model, message):
    data = write_toy_dataset(str(tmp_path / "ds"), n=16)
    with pytest.raises(DatasetMismatchError, match=message):
        train(tiny_config(data, str(tmp_path / "run"), model=model, data={"global_batch_size": 8}))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before the first step


def test_defaults_construct():
    assert TrainConfig().validate().model.name == "SiT-XL/2"


def test_preview_classes_are_checked():
    with pytest.raises(ConfigError, match=r"log.sample_classes '3,12': need ids in \[0, 10\)"):
        resolve("tiny-cpu", None, ["log.sample_every=5", "log.sample_classes=3,12"])


def test_presets_for_other_latents_and_shape_mismatch_names_both():
    from types import SimpleNamespace

    from latents.autoencoder import LatentTransform
    from trainer.train import DatasetMismatchError, check_dataset

    rae = preset("sit-xl1-rae-256").model.sit_config()
    assert (rae.in_channels, rae.input_size, rae.patch_size, rae.hidden_size) == (768, 16, 1, 1152)
    flux2 = preset("sit-xl1-flux2-256").model.sit_config()
    assert (flux2.in_channels, flux2.input_size, flux2.patch_size) == (128, 16, 1)
    f16c32 = preset("sit-xl1-f16c32-256").model.sit_config()
    assert (f16c32.in_channels, f16c32.input_size, f16c32.patch_size) == (32, 16, 1)
    card = SimpleNamespace(  # a FLUX.2 dataset at 256 px: stored 32 x 32 x 32, model space 128 x 16 x 16
        latent_shape=[32, 32, 32], num_classes=1000, autoencoder={"class": "AutoencoderKLFlux2"},
        latent_transform=LatentTransform(patch=2),
    )  # fmt: skip
    check_dataset("ds", card, flux2)
    with pytest.raises(DatasetMismatchError, match=r"\[128, 16, 16\] in the dataset \(stored \[32, 32, 32\], "
                       r"AutoencoderKLFlux2\), \[768, 16, 16\] in the model"):  # fmt: skip
        check_dataset("ds", card, rae)


def test_modern_presets_switch_everything_and_the_released_ones_nothing():
    for name in ("sit-xl2-256-modern", "sit-b2-256-modern"):
        c = preset(name).validate()
        m, t = c.model.sit_config(), c.transport.build()
        assert (m.mlp.value, m.norm.value, m.rope, m.qk_norm) == ("swiglu", "rmsnorm", True, True)
        assert (t.time_sampling.value, t.direction_weight) == ("logit_normal", 1.0)
        assert c.run_dir.endswith("-modern")
    released = preset("sit-xl2-256").validate()
    m, t = released.model.sit_config(), released.transport.build()
    assert (m.mlp.value, m.norm.value, m.rope, m.qk_norm) == ("gelu", "layernorm", False, False)
    assert (t.time_sampling.value, t.time_shift, t.direction_weight) == ("uniform", 1.0, 0.0)
    assert preset("sit-xl2-256-modern").model.name == released.model.name


def test_transport_options_reach_the_transport():
    c = resolve(
        "tiny-cpu",
        None,
        ["transport.time_sampling=Logit_Normal", "transport.logit_mean=0.5", "transport.time_shift=2"],
    )
    t = c.transport.build()
    assert (t.time_sampling.value, t.logit_mean, t.time_shift) == ("logit_normal", 0.5, 2.0)


def test_sit_models_lists_gmac_and_the_presets(capsys):
    assert sit(["models"]) == 0
    out = capsys.readouterr().out
    xl2 = next(line for line in out.splitlines() if line.startswith("SiT-XL/2 "))
    assert xl2.split()[-2:] == ["674,834,720", "118.6"]  # parameters, GMAC per forward (the papers')
    modern = next(line for line in out.splitlines() if line.startswith("sit-xl2-256-modern"))
    assert "swiglu/rmsnorm/rope/qk-norm" in modern and modern.split()[-1] == "118.6"
