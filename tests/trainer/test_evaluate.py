"""Evaluation while training (trainer.evaluate) at demo size, in one process.

The tiny-cpu model trains on the toy set (tests/trainer/conftest.py) with an evaluation point
every 20 steps. Checked: the latent Fréchet distance falls over the run; the last point equals
a recomputation from the final EMA export with `sit sample`'s sampler (`sampling.generate`,
the code of the Ray job's actors) on the same seeds, against the same reference set; the
``best`` export is the point with the lowest logged value; a resume does not repeat a point.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sampling.generate import Generator, ModelSource
from tests.trainer.conftest import tiny_config, write_toy_dataset
from trainer.config import ConfigError
from trainer.evaluate import best_export_url, eval_options, eval_plan, latent_fd, reference_latents
from trainer.export import read_export
from trainer.train import train

EVAL = {"eval_every": 20, "eval_samples": 96, "eval_reference": 256, "eval_steps": 10, "eval_batch": 32, "every": 10}


def eval_points(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == "eval"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    data = write_toy_dataset(str(tmp / "ds"), n=256, samples_per_shard=64)
    run_dir = tmp / "run"
    config = tiny_config(
        data, str(run_dir), total_steps=60, log=EVAL, checkpoint={"every": 30}, optim={"ema_decay": 0.9}
    )
    result = train(config)
    assert result.exit_code == 0
    return config, run_dir, data


def test_latent_fd_falls_and_best_export_is_the_lowest(trained):
    config, run_dir, _ = trained
    points = eval_points(run_dir)
    assert [p["step"] for p in points] == [20, 40, 60]
    fds = [p["eval_latent_fd"] for p in points]
    assert fds[-1] < fds[0] * 0.8, fds  # training moves the samples towards the data
    best = min(points, key=lambda p: p["eval_latent_fd"])
    _, _, extra = read_export(best_export_url(config))
    assert extra["eval"] == {"step": best["step"], "latent_fd": best["eval_latent_fd"]}
    assert points[-1]["eval_best_latent_fd"] == best["eval_latent_fd"]
    assert all(p["eval_images"] == 96 and p["eval_seconds"] > 0 for p in points)


def test_last_point_equals_sit_sample_recomputation(trained, tiny_vae_dir):
    config, run_dir, data = trained
    g = config.log
    gen = Generator(ModelSource(str(run_dir / "ema.safetensors"), str(tiny_vae_dir), allow_vae_mismatch=True))
    _, _, extra = read_export(str(run_dir / "ema.safetensors"))
    plan = eval_plan(g.eval_seed, g.eval_samples, config.model.num_classes, ())
    out = gen.generate(eval_options(g.eval_mode, g.eval_steps, extra["transport"]), plan, range(g.eval_samples), 7)
    fd = latent_fd(out.latents, reference_latents(data, g.eval_reference))
    logged = eval_points(run_dir)[-1]["eval_latent_fd"]
    assert math.isclose(fd, logged, rel_tol=1e-4), (fd, logged)
    assert np.array_equal(out.labels, np.arange(g.eval_samples) % config.model.num_classes)


def test_resume_continues_the_schedule_and_best(trained, tmp_path):
    """Train 20 steps more from the final checkpoint: one new point (80), the best carried over."""
    config, run_dir, _ = trained
    before = eval_points(run_dir)
    config.total_steps = 80
    assert train(config).resumed_from.endswith("step-000000060")
    after = eval_points(run_dir)[len(before) :]
    assert [p["step"] for p in after] == [80]
    assert after[0]["eval_best_latent_fd"] == min(p["eval_latent_fd"] for p in before + after)


@pytest.mark.parametrize(
    "values,match",
    [
        ({"eval_every": 5, "eval_samples": 1}, "at least 2"),
        ({"eval_every": 5, "eval_mode": "sde2"}, "eval_mode"),
        ({"eval_every": 5, "eval_classes": "99"}, "eval_classes"),
        ({"eval_every": 5, "inception": "x.pt"}, "inception_reference"),
        ({"wandb_mode": "maybe"}, "wandb_mode"),
    ],
)
def test_bad_eval_settings_are_refused(tmp_path, values, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config("unused", str(tmp_path), log=values)


def test_inception_fid_is_logged_and_recomputes(tmp_path, tiny_vae_dir):
    """With log.inception (a TorchScript stand-in of the Inception network) and reference
    statistics, each point also logs FID of the decoded samples; recomputed from the export."""
    import warnings

    import torch

    from sampling.fid import Statistics, extract, frechet_distance, load_inception
    from tests.sampling.conftest import InceptionStandIn

    inception = tmp_path / "inception.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(InceptionStandIn()).save(str(inception))
    rng = np.random.default_rng(0)
    real = extract(load_inception(str(inception)), [rng.integers(0, 256, (32, 64, 64, 3), dtype=np.uint8)])
    stats = Statistics.of(real.features)
    reference = tmp_path / "ref.npz"
    np.savez(reference, mu=stats.mu, sigma=stats.sigma)
    data = write_toy_dataset(str(tmp_path / "ds"), n=64)
    log = {"eval_every": 4, "eval_samples": 16, "eval_steps": 4, "inception": str(inception)}
    log |= {"inception_reference": str(reference), "vae": str(tiny_vae_dir)}
    config = tiny_config(data, str(tmp_path / "run"), total_steps=4, log=log)
    train(config)
    point = eval_points(tmp_path / "run")[-1]
    assert math.isfinite(point["eval_fid"]) and point["eval_fid"] > 0

    gen = Generator(ModelSource(str(tmp_path / "run" / "ema.safetensors"), str(tiny_vae_dir), allow_vae_mismatch=True))
    _, _, extra = read_export(str(tmp_path / "run" / "ema.safetensors"))
    plan = eval_plan(0, 16, config.model.num_classes, ())
    latents = torch.from_numpy(gen.generate(eval_options("SDE", 4, extra["transport"]), plan, range(16), 16).latents)
    images = [gen.autoencoder.decode_to_uint8(latents[i : i + 1], gen.transform) for i in range(16)]
    fake = Statistics.of(extract(load_inception(str(inception)), images).features)
    fid = frechet_distance(fake.mu, fake.sigma, stats.mu, stats.sigma)
    assert math.isclose(fid, point["eval_fid"], rel_tol=1e-3), (fid, point["eval_fid"])
