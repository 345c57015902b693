"""Sampling job parts without Ray: per-sample determinism, checkpoint loading and its refusals,
the run description, pictures and grids, and the `sit sample` command line."""

from __future__ import annotations

import io
import json
import re
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from cluster.cli import main
from latents.autoencoder import AutoencoderNotFoundError, LatentTransform, load_autoencoder, to_uint8
from latents.pictures import image_grid, latent_picture
from sampling.checkpoint import CheckpointError, check_fits_autoencoder, load_checkpoint
from sampling.generate import Generator, ModelSource, NonFiniteSamplesError, sample_grid
from sampling.options import Mode, SamplerOptions, run_sampler
from sampling.output import RunMismatchError, chunk_bytes, claim_run, read_chunk
from sampling.plan import ClassPolicy, SamplePlan, sample_seed
from tests.sampling.conftest import NAN_CLASS, TINY, tiny_sit
from trainer.export import save_export
from trainer.model import SiT, SiTConfig
from trainer.transport import PathType, Prediction


def test_sample_is_a_function_of_seed_and_index_alone():
    plan = SamplePlan(seed=3, num_samples=20, num_classes=10)
    noise, labels, _ = plan.start([2, 7, 11], (4, 8, 8))
    alone_noise, alone_labels, _ = plan.start([7], (4, 8, 8))
    assert torch.equal(noise[1], alone_noise[0]) and labels[1] == alone_labels[0]
    assert len({sample_seed(3, i) for i in range(1000)} | {sample_seed(4, i) for i in range(1000)}) == 2000
    assert SamplePlan(0, 20, 10, ClassPolicy.BALANCED).start(range(12), (1,))[1].tolist() == [*range(10), 0, 1]
    assert SamplePlan(0, 5, 10, ClassPolicy.LIST, (4, 2)).start(range(5), (1,))[1].tolist() == [4, 2, 4, 2, 4]
    with pytest.raises(ValueError, match=r"--classes \[12\] outside \[0, 10\)"):
        SamplePlan(0, 5, 10, ClassPolicy.LIST, (1, 12))


@pytest.mark.parametrize("options", [SamplerOptions(num_steps=12, cfg_scale=3.0), SamplerOptions(Mode.ODE, "heun", 6)])
def test_latents_do_not_depend_on_the_batch(options):
    """Bitwise: a sample run alone equals the same sample inside a batch (SDE with CFG, and ODE)."""
    model = tiny_sit()
    plan = SamplePlan(seed=1, num_samples=8, num_classes=10)
    noise, labels, gens = plan.start(range(5), (4, 8, 8))
    batch = run_sampler(model, options, noise, labels, gens).x
    for i in (0, 3, 4):
        n, y, g = plan.start([i], (4, 8, 8))
        assert torch.equal(run_sampler(model, options, n, y, g).x[0], batch[i]), i


def test_sampler_runs_the_asked_number_of_model_calls():
    options = SamplerOptions(num_steps=10, cfg_scale=2.0)
    noise, labels, gens = SamplePlan(0, 2, 10).start(range(2), (4, 8, 8))
    out = run_sampler(tiny_sit(), options, noise, labels, gens)
    assert out.nfe == options.nfe_per_sample() == 10


def test_released_checkpoint_loads_and_matches_released_outputs(reference_dir):
    model, digest, trained = load_checkpoint(str(reference_dir / "released_sit_tiny" / "state_dict.pt"), num_heads=4)
    ref = torch.load(reference_dir / "released_sit_tiny" / "inputs_outputs.pt", weights_only=True)
    readme = json.loads((reference_dir / "released_sit_tiny" / "README.json").read_text())["config"]
    c = model.config
    assert (c.depth, c.hidden_size, c.patch_size, c.input_size, c.num_classes) == (
        readme["depth"],
        readme["hidden_size"],
        readme["patch_size"],
        readme["input_size"],
        readme["num_classes"],
    )
    with torch.no_grad():
        torch.testing.assert_close(model(ref["x"], ref["t"], ref["y"]), ref["out"], rtol=1e-5, atol=1e-5)
    assert len(digest) == 64 and trained is None


def test_released_checkpoint_needs_heads_and_checks_presets(reference_dir):
    url = str(reference_dir / "released_sit_tiny" / "state_dict.pt")
    with pytest.raises(CheckpointError, match="hidden size 64 matches no preset; pass --num-heads"):
        load_checkpoint(url)
    with pytest.raises(CheckpointError, match="--model SiT-S/2 has depth 12, the checkpoint 2"):
        load_checkpoint(url, model_name="SiT-S/2")


def test_bad_inputs_are_refused_naming_them(tmp_path, tiny_export, tiny_vae_dir):
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*missing\.pt"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    with pytest.raises(AutoencoderNotFoundError, match="no-vae"):
        Generator(ModelSource(tiny_export, str(tmp_path / "no-vae")))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pt: neither a SiT export nor a torch checkpoint"):
        load_checkpoint(str(junk))
    ae = load_autoencoder(str(tiny_vae_dir))
    model, _, _ = load_checkpoint(tiny_export)
    sd = LatentTransform(scale=0.18215)
    assert check_fits_autoencoder(model, ae, sd, None, "ckpt") == 64
    with pytest.raises(CheckpointError, match=r"shape \(C, H, W\) is \(4, 8, 8\), .* gives \(4, 32, 32\) at 256"):
        check_fits_autoencoder(model, ae, sd, 256, "ckpt")
    eight = SiTConfig(**{**TINY.__dict__, "in_channels": 8})
    url = str(tmp_path / "eight.safetensors")
    save_export(url, SiT(eight).state_dict(), eight)
    with pytest.raises(CheckpointError, match=r"eight\.safetensors: .* is \(8, 8, 8\), .* gives \(4, 8, 8\)"):
        Generator(ModelSource(url, str(tiny_vae_dir)))


def test_export_transport_is_the_default(tmp_path, tiny_vae_dir):
    url = str(tmp_path / "gvp.safetensors")
    trained = {"path_type": "GVP", "prediction": "noise", "loss_weight": "none", "train_eps": -1.0, "sample_eps": 0.01}
    save_export(url, tiny_sit().state_dict(), TINY, {"transport": trained})
    gen = Generator(ModelSource(url, str(tiny_vae_dir)))
    resolved = gen.resolve(SamplerOptions())
    assert (resolved.path_type, resolved.prediction, resolved.sample_eps) == (PathType.GVP, Prediction.NOISE, 0.01)
    explicit = gen.resolve(SamplerOptions(path_type=PathType.LINEAR, sample_eps=0.02))
    assert (explicit.path_type, explicit.prediction, explicit.sample_eps) == (PathType.LINEAR, Prediction.NOISE, 0.02)
    assert SamplerOptions().with_training_transport(None).transport().path_type is PathType.LINEAR


def test_non_finite_samples_are_named(nan_export, tiny_vae_dir):
    gen = Generator(ModelSource(nan_export, str(tiny_vae_dir)))
    plan = SamplePlan(0, 4, 10, ClassPolicy.LIST, (0, NAN_CLASS, 1, 2))
    with pytest.raises(NonFiniteSamplesError, match=r"NaN/Inf latents in samples \[1\] \(1 of 4\)"):
        gen.generate(SamplerOptions(num_steps=4), plan, range(4), 4)


def test_run_description_is_claimed_once(tmp_path):
    from latents.storage import Root

    root = Root(str(tmp_path / "out"))
    assert claim_run(root, {"seed": 1, "n": 4}) is False
    assert claim_run(root, {"seed": 1, "n": 4}) is True
    with pytest.raises(RunMismatchError, match=r"n: there 4, now 5; seed: there 1, now 2"):
        claim_run(root, {"seed": 2, "n": 5})


def test_pictures_and_grids(tiny_vae_dir):
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 1.5]).reshape(1, 1, 1, 6).expand(1, 3, 1, 6)
    # ADM / released sample.py rounding: clamp((x + 1) * 127.5 + 0.5, 0, 255), truncated
    assert to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 128, 191, 255, 255]
    ae = load_autoencoder(str(tiny_vae_dir))
    images = ae.decode_to_uint8(torch.randn(6, 4, 8, 8), LatentTransform(scale=0.18215))
    assert images.shape == (6, 64, 64, 3) and images.dtype == np.uint8
    grid = image_grid(images, 3, ["class 1", "class 2"])
    assert grid.size == (80 + 3 * 64, 2 * 64)
    assert image_grid(images, 4).size == (4 * 64, 2 * 64)
    with pytest.raises(ValueError, match="3 row labels for 2 rows"):
        image_grid(images, 3, ["a", "b", "c"])
    pics = latent_picture(torch.randn(5, 4, 8, 8))
    assert pics.shape == (5, 8, 8, 3) and pics.min() == 0 and pics.max() == 255


def test_grid_images_are_the_bulk_jobs_images(tiny_export, tiny_vae_dir):
    source = ModelSource(tiny_export, str(tiny_vae_dir))
    options = SamplerOptions(num_steps=5, cfg_scale=2.0)
    grid = np.asarray(sample_grid(source, options, (5, 6), 2, seed=9))
    plan = SamplePlan(9, 4, 10, ClassPolicy.LIST, (5, 5, 6, 6))
    images = Generator(source).generate(options, plan, range(4), 4).images
    assert np.array_equal(grid[64:128, 80 + 64 : 80 + 128], images[3])


def test_sit_sample_grid_command(tiny_export, tiny_vae_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    argv = ["sample", tiny_export, str(out), "--vae", str(tiny_vae_dir), "--grid", "--classes", "1,2", "--steps", "4"]
    assert main([*argv, "--per-class", "3", "--cfg-scale", "2", "--guided-channels", "3"]) == 0
    assert Image.open(out).size == (80 + 3 * 64, 2 * 64)
    assert "grid of 2 classes x 3 samples" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num-samples", "4", "--diffusion-form", "wobbly"], "unknown DiffusionForm 'wobbly'; valid: constant, SBDM"),
        (["--num-samples", "4", "--mode", "ODE", "--method", "rk5"], "unknown ODE method 'rk5'"),
        ([], "--num-samples is required"),
        (["--num-samples", "4", "--guided-channels", "some"], "--guided-channels must be 'all' or a positive count"),
    ],
)
def test_sit_sample_rejects_bad_flags(tiny_export, tiny_vae_dir, tmp_path, capsys, flags, message):
    code = main(["sample", tiny_export, str(tmp_path / "out"), "--vae", str(tiny_vae_dir), *flags])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("sit sample: error: ") and err.count("\n") == 1
    assert message in err
    with pytest.raises(ValueError, match=re.escape(message)):  # --debug: the exception itself
        main(["--debug", "sample", tiny_export, str(tmp_path / "out"), "--vae", str(tiny_vae_dir), *flags])


def test_chunk_tars_are_deterministic_and_hold_latents():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    labels = np.array([4, 0, 9])
    latents = rng.standard_normal((3, 4, 2, 2)).astype(np.float32)
    data = chunk_bytes(range(6, 9), images, labels, latents)
    assert data == chunk_bytes(range(6, 9), images.copy(), labels, latents)  # fixed headers: same bytes
    back_images, back_labels = read_chunk(data, "chunk", range(6, 9))
    assert np.array_equal(back_images, images) and back_labels.tolist() == [4, 0, 9]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getnames()[:3] == ["00000006.png", "00000006.cls", "00000006.latent.npy"]
        assert all(m.mtime == 0 and m.uid == 0 for m in tar.getmembers())
        stored = np.load(io.BytesIO(tar.extractfile("00000008.latent.npy").read()))
    assert np.array_equal(stored, latents[2])
