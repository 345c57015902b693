"""`sit sweep` on a toy dataset: a 2-point grid trained and sampled, its table, json and chart;
a rerun skips finished rows; a changed config or sampler never reuses another's result."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from cluster.cli import main
from tests.trainer.conftest import write_toy_dataset

BASE = [
    "--preset", "tiny-cpu", "--steps", "8",
    "--set", "log.tensorboard=false", "--set", "log.progress=false", "--set", "checkpoint.every=4",
    "--set", "data.global_batch_size=16",
    "--num-samples", "16", "--sample-steps", "4", "--reference", "64", "--allow-vae-mismatch",
]  # fmt: skip


@pytest.fixture
def sweep_args(tmp_path, tiny_vae_dir):
    data = write_toy_dataset(str(tmp_path / "ds"), n=64)
    out = tmp_path / "sweep"
    return [
        "sweep", *BASE, "--data", data, "--vae", str(tiny_vae_dir), "--out", str(out)
    ], out  # fmt: skip


@pytest.mark.slow
def test_two_point_sweep_reports_and_resumes(sweep_args, capsys):
    argv, out = sweep_args
    grid = ["--grid", "transport.path_type=Linear,GVP"]
    assert main([*argv, *grid]) == 0
    first = capsys.readouterr().out
    assert "point 1/2" in first and "point 2/2" in first and "ETA" in first and "best:" in first

    report = json.loads((out / "sweep.json").read_text())
    rows = report["rows"]
    assert [(r["transport.path_type"], r["sampler"]) for r in rows] == [("Linear", "ODE euler"), ("GVP", "ODE euler")]
    assert all(math.isfinite(r["latent_fd"]) and r["latent_fd"] > 0 and not r["reused"] for r in rows)
    assert rows[0]["config_hash"] != rows[1]["config_hash"]
    table = (out / "sweep.md").read_text()
    assert "| path_type | sampler | NFE | latent FD | rank |" in table
    for r in rows:
        assert f"| {r['transport.path_type']} | ODE euler | 4 | {r['latent_fd']:.3f} |" in table
    assert Image.open(out / "sweep.png").size[1] > 60
    for r in rows:  # the exact resolved config beside the result, as the trainer ran it
        point = out / "points" / r["config_hash"]
        config = json.loads((point / "config.json").read_text())
        assert config["transport"]["path_type"] == r["transport.path_type"] and config["total_steps"] == 8
        assert json.loads((point / "train" / "config.json").read_text()) == config
        assert json.loads((point / r["eval_hash"] / "result.json").read_text())["latent_fd"] == r["latent_fd"]

    # the same command again: nothing trained or sampled, the same numbers
    assert main([*argv, *grid]) == 0
    second = capsys.readouterr().out
    assert "2 finished earlier, 0 points to train" in second and "training" not in second
    again = json.loads((out / "sweep.json").read_text())["rows"]
    assert [r["latent_fd"] for r in again] == [r["latent_fd"] for r in rows] and all(r["reused"] for r in again)

    # another sampler on a trained point: the training is reused, the new row is sampled
    assert main([*argv, "--grid", "transport.path_type=Linear", "--samplers", "ode,sde:linear"]) == 0
    third = capsys.readouterr().out
    assert "1 finished earlier, 1 points to train or resume" in third and "reusing the finished EMA export" in third
    new = json.loads((out / "sweep.json").read_text())["rows"]
    assert [r["sampler"] for r in new] == ["ODE euler", "SDE linear"] and [r["reused"] for r in new] == [True, False]

    # a changed config (learning rate) is a new point in a new folder: never the old result
    assert main([*argv, "--grid", "transport.path_type=Linear", "--set", "optim.lr=5e-4", "--dry-run"]) == 0
    (changed,) = capsys.readouterr().out.splitlines()
    config_hash, eval_hash = changed.split()[0].split("/")
    assert config_hash not in {r["config_hash"] for r in rows} and not (out / "points" / config_hash).exists()
    assert eval_hash not in {r["eval_hash"] for r in new}


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (["--grid", "transport.path_typ=Linear,GVP"], "--grid"),
        (["--grid", "transport.path_type=Linear,Curved"], "--grid"),
        (["--grid", "transport.path_type"], "--grid"),
        (["--grid", "optim.lr=1e-3,fast"], "--grid"),
        (["--samplers", "ode,sde:bogus"], "--samplers"),
        (["--samplers", "euler"], "--samplers"),
        (["--set", "optim.lrr=1"], "--set"),
        (["--paper", "--grid", "transport.path_type=Linear"], "--grid"),
        (["--inception", "x.pt"], "--ref"),
        (["--train-gpus", "1"], "--train-gpus"),  # without --address
        (["--address", "auto", "--train-cpus", "0"], "--train-cpus"),
    ],
)
def test_bad_grid_or_sampler_is_one_line_exit_2(tmp_path, tiny_vae_dir, capsys, extra, flag):
    out = tmp_path / "sweep"
    argv = ["sweep", *BASE, "--data", str(tmp_path / "ds"), "--vae", str(tiny_vae_dir), "--out", str(out), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"sit sweep: error: argument {flag}:"), err
    assert not out.exists()


def test_paper_grid_is_path_x_prediction_x_samplers(tmp_path, tiny_vae_dir, capsys):
    data = write_toy_dataset(str(tmp_path / "ds"), n=16)
    argv = ["sweep", *BASE, "--paper", "--data", data, "--vae", str(tiny_vae_dir), "--out", str(tmp_path / "s")]
    assert main([*argv, "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 * 3 * 6 and len({line.split()[0] for line in lines}) == 54
    assert len({line.split("/")[0] for line in lines}) == 9  # 9 trainings, each sampled 6 ways
    assert sum("ODE euler" in line for line in lines) == 9
    for form in ("SBDM", "sigma", "linear", "decreasing", "increasing-decreasing"):
        assert sum(line.endswith(f"SDE {form}") for line in lines) == 9
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_ray_sampling_draws_the_same_latents_as_in_process(tmp_path, tiny_vae_dir, ray_address):
    """--address samples with `sit sample`'s Ray job; without, in this process: the same latents."""
    import argparse

    import numpy as np

    from cluster.sweep import Row, _sample_here, _sample_on_ray, parse_samplers
    from sampling.generate import ModelSource

    export, point = exported_point(tmp_path)
    sampler = parse_samplers("sde:linear", 4)[0]
    args = argparse.Namespace(
        vae=str(tiny_vae_dir), num_samples=12, sample_seed=3, batch_size=5, inception=None, address=ray_address
    )
    source = ModelSource(str(export), str(tiny_vae_dir), allow_vae_mismatch=True)
    rows = [Row(point, sampler, name, tmp_path / "point" / name) for name in ("here", "ray")]
    for row in rows:
        row.dir.mkdir()
    here, _ = _sample_here(rows[0], args, source)
    on_ray, _ = _sample_on_ray(rows[1], args, source)
    assert here.shape == (12, 4, 8, 8) and np.array_equal(here, on_ray)


@pytest.mark.slow
def test_points_train_side_by_side_on_ray_to_the_same_model_as_here(sweep_args, ray_address, capsys, monkeypatch):
    """--address submits every point's training as a Ray task at once: they overlap in time, each
    point's EMA equals the one trained here, a failed training is that point's error, and a
    request no node can meet is one line, exit 2. Relative paths mean what they mean on the driver."""
    from safetensors.torch import load_file

    from cluster.cli import build_parser
    from cluster.sweep import TrainFailed, plan_sweep, start_trainings_on_ray, train_point, wait_for_training

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what Ray gives a 1-CPU task: the same threads here
    argv, out = sweep_args
    monkeypatch.chdir(out.parent)  # not the Ray workers' directory: a relative --data must still be found
    grid = ["--grid", "transport.path_type=Linear,GVP", "--data", "ds"]
    ray_argv = [*argv, *grid, "--address", ray_address, "--train-cpus", "0.5"]
    assert main(ray_argv) == 0
    log = capsys.readouterr().out
    assert "2 trainings submitted to the Ray cluster" in log and log.count("steps (on Ray)") == 2
    assert "of the samplings (trainings run on Ray)" in log and "2 of 2 rows (0 reused, 0 failed)" in log

    on_ray = plan_sweep(build_parser().parse_args(ray_argv)).points
    started = [(p.dir / "point.json").stat().st_mtime for p in on_ray]
    ended = [(Path(p.config.run_dir) / "ema.safetensors").stat().st_mtime for p in on_ray]
    assert max(started) < min(ended)  # side by side, not one after the other

    here = plan_sweep(build_parser().parse_args([*argv, *grid, "--out", str(out.parent / "here")])).points[0]
    assert here.key == on_ray[0].key and here.dir != on_ray[0].dir
    assert train_point(here) is not None
    ema = [load_file(str(Path(p.config.run_dir) / "ema.safetensors")) for p in (here, *on_ray)]
    assert ema[0].keys() == ema[1].keys() and all(torch.equal(ema[0][k], ema[1][k]) for k in ema[0])
    assert not all(torch.equal(ema[1][k], ema[2][k]) for k in ema[1])  # GVP is another model

    broken_args = build_parser().parse_args([*ray_argv, "--data", str(out / "missing")])
    (broken,) = [p for p in plan_sweep(broken_args).points if p.values["transport.path_type"] == "Linear"]
    with pytest.raises(TrainFailed, match=r"exit code 1: .*missing"):
        wait_for_training(start_trainings_on_ray([broken], broken_args)[broken.key])

    assert main([*ray_argv, "--grid", "optim.lr=5e-4", "--train-gpus", "1"]) == 2  # new points, on a CPU cluster
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --train-gpus: no node of the Ray cluster" in err, err


def test_a_point_on_several_gpus_is_started_by_torchrun_with_that_many_ranks(tmp_path):
    from torch.distributed.run import get_args_parser

    from cluster.sweep import Point, train_command

    point = Point({}, None, "abc", tmp_path / "points" / "abc")
    one = train_command(point)
    assert one[1:] == ["-m", "trainer.train", "--preset", "tiny-cpu", "--config", str(point.dir / "config.json")]
    four = train_command(point, 4)
    assert four[1:3] == ["-m", "cluster.torchrun"]
    launch = get_args_parser().parse_args(four[3:])  # what torchrun's own parser makes of the rest
    assert launch.standalone and launch.nproc_per_node == "4" and launch.module
    assert [launch.training_script, *launch.training_script_args] == one[2:]


def test_fid_path_samples_the_same_latents_and_scores_them_like_sit_eval(tmp_path, tiny_vae_dir):
    """With --inception and --ref a row decodes its samples to samples.npz and records `sit eval`'s
    FID of them; its latents (hence its latent FD) are those of the latent-only path."""
    import argparse

    import numpy as np
    import torch

    from cluster.sweep import Row, parse_samplers, sample_row
    from sampling.evaluate import evaluate
    from tests.sampling.conftest import InceptionStandIn

    inception_standin = tmp_path / "inception.pt"
    torch.jit.script(InceptionStandIn()).save(str(inception_standin))
    _, point = exported_point(tmp_path)
    sampler = parse_samplers("ode", 3)[0]
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (10, 64, 64, 3), dtype=np.uint8))
    reference = np.random.default_rng(1).standard_normal((64, 4, 8, 8)).astype(np.float32)
    common = {"vae": str(tiny_vae_dir), "num_samples": 10, "sample_seed": 3, "batch_size": 4, "address": None}
    rows = {}
    for name, inception in (("fid", str(inception_standin)), ("latent", None)):
        args = argparse.Namespace(**common, inception=inception, ref=str(ref), allow_vae_mismatch=True)
        rows[name] = Row(point, sampler, name, tmp_path / "point" / name)
        sample_row(rows[name], args, reference)
    with_fid, without = (json.loads((rows[n].dir / "result.json").read_text()) for n in ("fid", "latent"))
    assert without["fid"] is None and not (rows["latent"].dir / "samples.npz").exists()
    assert with_fid["latent_fd"] == without["latent_fd"] and math.isfinite(with_fid["latent_fd"])
    images = np.load(rows["fid"].dir / "samples.npz")["arr_0"]
    assert images.shape == (10, 64, 64, 3) and images.dtype == np.uint8
    expected = evaluate(str(rows["fid"].dir / "samples.npz"), str(ref), str(inception_standin), progress=False).fid
    assert with_fid["fid"] == pytest.approx(expected) and with_fid["fid"] > 0


def exported_point(tmp_path):
    """A sweep point whose training is done: a tiny SiT's EMA export in its run directory."""
    from cluster.sweep import Point
    from tests.sampling.conftest import TINY, tiny_sit
    from trainer.config import preset
    from trainer.export import save_export

    export = tmp_path / "point" / "train" / "ema.safetensors"
    export.parent.mkdir(parents=True)
    save_export(str(export), tiny_sit().state_dict(), TINY, {"step": 0})
    config = preset("tiny-cpu")
    config.run_dir = str(export.parent)
    return export, Point({}, config, "point", tmp_path / "point")


def test_eta_counts_trainings_only_when_they_run_one_after_the_other(tmp_path):
    from cluster.sweep import Progress

    for on_ray in (False, True):
        log = Progress(tmp_path, trains=3, samples=6)
        log.parallel_trainings = on_ray
        first = "sampling" if on_ray else "training and sampling"
        assert log.eta() == f"ETA after the first {first}"
        log.done("train", 60.0)
        log.done("sample", 6.0)
        # left: 2 trainings (2 min, one after the other) and 5 samplings (0.5 min)
        assert log.eta() == ("ETA 0.5 min of the samplings (trainings run on Ray)" if on_ray else "ETA 2.5 min")


def test_a_trainer_gets_sigterm_when_the_process_that_started_it_is_killed(tmp_path):
    """`end_with_parent` (what train_point starts the trainer with): a parent killed outright (a Ray
    worker killed for memory) takes its trainer down with SIGTERM, the trainer's "checkpoint and
    exit 75", instead of leaving it to train on beside a rerun."""
    import os
    import signal
    import subprocess
    import sys
    import time

    ready, termed = tmp_path / "ready", tmp_path / "termed"
    child = (
        "import pathlib, signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path({str(termed)!r}).touch(), sys.exit(0)))\n"
        f"pathlib.Path({str(ready)!r}).write_text(str(__import__('os').getpid()))\n"
        "time.sleep(60)\n"
    )
    parent = (
        "import subprocess, sys, time\n"
        "from cluster.sweep import end_with_parent\n"
        f"subprocess.Popen([sys.executable, '-c', {child!r}], preexec_fn=end_with_parent)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent], cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "the child never started"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while not termed.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert termed.exists(), "the child did not get SIGTERM when its parent was killed"
    finally:
        proc.kill()
        if ready.exists() and not termed.exists():
            os.kill(int(ready.read_text()), signal.SIGKILL)
