"""Weights & Biases (trainer.wandb_log): one run across a preemption, every step once; an
optional dependency with a one-line error.

The trainer runs with ``log.wandb=true`` in offline mode, is stopped by SIGTERM (exit 75) and
started again; the offline transaction logs it leaves (`tests.trainer.wandb_files` reads them)
must hold one run id, the config sent once, and a history in which each step appears once,
with the eval points and the sample grids in it.
"""

from __future__ import annotations

import signal
import sys

import pytest

from tests.trainer.conftest import interrupt_at, run, train_command, write_toy_dataset
from tests.trainer.wandb_files import config_keys, history, offline_runs, run_id
from trainer.preempt import EXIT_PREEMPTED

STEPS = 16
WANDB = [
    "log.wandb=true",
    "log.wandb_mode=offline",
    "log.wandb_project=sit-test",
    "log.wandb_tags=test,offline",
    "log.every=1",
    "log.eval_every=5",
    "log.eval_samples=16",
    "log.eval_steps=4",
    "log.sample_every=8",
    "log.sample_per_class=2",
    "log.sample_steps=4",
    "checkpoint.every=100",
    f"total_steps={STEPS}",
]


@pytest.mark.slow
def test_offline_run_preempted_and_resumed_is_one_run_with_each_step_once(tmp_path):
    data = write_toy_dataset(str(tmp_path / "ds"), n=64)
    run_dir = tmp_path / "run"
    command = train_command(1, data, str(run_dir), *WANDB)
    rc, out, _ = interrupt_at(command, str(run_dir), 7, signal.SIGTERM)
    assert rc == EXIT_PREEMPTED, out[-3000:]
    result = run(command)
    assert result.returncode == 0, result.stdout[-3000:]

    files = offline_runs(run_dir)
    assert len(files) == 2, files  # one offline directory per process ...
    assert run_id(files[0]) == run_id(files[1])  # ... of one W&B run
    assert "model" in config_keys(files[0]) and config_keys(files[1]) == set()  # the config once
    rows = [row for f in files for row in history(f)]
    steps = [row["_step"] for row in rows]
    assert sorted(steps) == list(range(1, STEPS + 1)), steps  # every step, exactly once
    assert all("loss" in row and "images_per_s" in row for row in rows)
    evals = [row["_step"] for row in rows if "eval_latent_fd" in row]
    assert evals == [5, 10, 15], evals
    grids = [row for row in rows if row.get("samples/_type") == "image-file"]
    assert [row["_step"] for row in grids] == [8, 16]
    assert all(list(run_dir.glob(f"wandb/offline-run-*/files/{row['samples/path']}")) for row in grids)


def test_wandb_not_installed_is_one_clear_line(tmp_path, monkeypatch, capsys):
    from cluster.cli import main

    data = write_toy_dataset(str(tmp_path / "ds"), n=64)
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    args = ["train", "--preset", "tiny-cpu", "--data", data, "--run-dir", str(tmp_path / "run"), "--steps", "2"]
    args += ["--set", "log.wandb=true", "--set", "log.tensorboard=false", "--set", "log.progress=false"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "log.wandb=true but the wandb package is not installed: pip install 'sit-pipeline[wandb]'" in err
