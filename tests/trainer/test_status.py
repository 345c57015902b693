"""`sit status`: the right step, checkpoint and evaluation values of a finished run; one line for
a directory that is not a run."""

from __future__ import annotations

import json

import pytest

from cluster.cli import main
from tests.trainer.conftest import tiny_config, write_toy_dataset
from trainer.status import read_status
from trainer.train import train


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("status")
    data = write_toy_dataset(str(tmp / "ds"), n=64)
    run_dir = tmp / "run"
    log = {"every": 5, "eval_every": 10, "eval_samples": 16, "eval_steps": 4}
    train(tiny_config(data, str(run_dir), total_steps=20, log=log, checkpoint={"every": 10}))
    return run_dir


def test_status_of_a_finished_run(finished_run, capsys):
    lines = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if r.get("event") == "eval"]
    best = min(evals, key=lambda r: r["eval_latent_fd"])
    assert main(["status", str(finished_run)]) == 0
    out = capsys.readouterr().out
    assert "state       finished" in out
    assert "step        20 / 20 (100.0%)" in out
    assert "images      640 seen" in out  # 20 steps of 32
    assert f"checkpoint  {finished_run}/checkpoints/step-000000020 (step 20)" in out
    assert f"eval last   step 20: latent FD {evals[-1]['eval_latent_fd']:.4g}" in out
    assert f"eval best   step {best['step']}: latent FD {best['eval_latent_fd']:.4g}" in out
    assert f"best {finished_run}/ema-best.safetensors" in out and "ETA         done" in out


def test_status_of_a_run_in_progress_has_an_eta(finished_run, tmp_path):
    copy = tmp_path / "run"
    copy.mkdir()
    config = json.loads((finished_run / "config.json").read_text())
    config["total_steps"] = 120
    (copy / "config.json").write_text(json.dumps(config))
    (copy / "metrics.jsonl").write_text((finished_run / "metrics.jsonl").read_text() + '{"step": 21, "lo')
    s = read_status(str(copy))
    assert s.step == 20 and s.state == "running" and s.checkpoint is None  # the torn last line is ignored
    assert s.eta_seconds == pytest.approx(100 * 32 / s.images_per_s)


@pytest.mark.parametrize("kind", ["missing", "foreign"])
def test_not_a_run_is_one_line(tmp_path, capsys, kind):
    target = tmp_path / "nothing"
    if kind == "foreign":
        target.mkdir()
        (target / "notes.txt").write_text("not a run")
    assert main(["status", str(target)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    if kind == "missing":
        assert f"sit status: error: RUN_DIR_OR_URL {target}: not found" in err
    else:
        assert f"sit status: error: {target}: not a training run directory (no config.json" in err


def test_status_of_a_run_directory_on_gcs(finished_run, gcs_bucket, capsys):
    """The run directory synced to object storage (here the GCS emulator): the same screen."""
    import gcsfs

    fs = gcsfs.GCSFileSystem(skip_instance_cache=True)
    url = f"{gcs_bucket}/runs/tiny"
    fs.put(str(finished_run), url.removeprefix("gs://"), recursive=True)
    assert main(["status", url]) == 0
    out = capsys.readouterr().out
    assert "state       finished" in out and "step        20 / 20 (100.0%)" in out
    assert f"checkpoint  {url}/checkpoints/step-000000020 (step 20)" in out
    assert f"best {url}/ema-best.safetensors" in out
