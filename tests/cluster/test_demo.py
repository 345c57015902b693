"""`sit demo --quick` end to end (images -> VAE -> Ray encode -> train, SIGTERM, resume -> Ray
sample -> report), then a second run into the same folder, which must reuse every step."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from cluster.cli import main
from cluster.demo import GRID_COLUMNS, SIZES
from cluster.demo_data import BROKEN_FILES, CLASSES
from latents.words import plural


@pytest.mark.slow
def test_quick_demo_runs_end_to_end_and_reruns(tmp_path, ray_address, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--address", ray_address]) == 0
    first = capsys.readouterr().out

    report = out / "report"
    assert sorted(p.name for p in report.iterdir()) == ["grid.png", "loss.png", "summary.json", "summary.md"]
    s = json.loads((report / "summary.json").read_text())
    size = SIZES["quick"]
    good = size.per_class * len(CLASSES)
    assert s["images"]["good"] == good and s["images"]["broken"] == len(BROKEN_FILES)
    assert s["encode"]["encoded"] == good and s["encode"]["rejected"] == len(BROKEN_FILES)  # counts reconcile
    assert sum(s["encode"]["rejects"].values()) == len(BROKEN_FILES)
    assert (
        0 < s["train"]["interrupted_at"] < size.train_steps and s["train"]["resumed_at"] == s["train"]["interrupted_at"]
    )
    assert "sending SIGTERM" in first and f"resumed at step {s['train']['resumed_at']}" in first
    fd = s["latent_frechet_distance"]
    assert all(math.isfinite(v) and v > 0 for v in fd.values())
    assert s["fd_ratio_trained_over_untrained"] == pytest.approx(fd["trained"] / fd["untrained"])
    assert "rejected" in (report / "summary.md").read_text()
    evals = s["train"]["eval"]  # evaluation while training: every train_steps / 4 steps
    assert [e["step"] for e in evals] == [10, 20, 30, 40] and all(e["latent_fd"] > 0 for e in evals)
    assert "Latent FD of the EMA during training" in (report / "summary.md").read_text()

    assert main(["status", str(out / "run")]) == 0  # sit status on the demo's run directory
    status = capsys.readouterr().out
    assert f"step        {size.train_steps} / {size.train_steps} (100.0%)" in status
    assert f"checkpoint  {out / 'run' / 'checkpoints'}/step-{size.train_steps:09d} (step {size.train_steps})" in status
    assert f"eval last   step 40: latent FD {evals[-1]['latent_fd']:.4g}" in status
    best = min(evals, key=lambda e: e["latent_fd"])
    assert f"eval best   step {best['step']}: latent FD {best['latent_fd']:.4g}" in status

    grid = Image.open(report / "grid.png")
    tile = 32 * 2  # 32-px samples, drawn at twice their size
    assert grid.height >= len(CLASSES) * tile and grid.width >= GRID_COLUMNS * tile
    assert Image.open(report / "loss.png").size[0] > 0

    assert main(["demo", "--quick", "--out", str(out), "--address", ray_address]) == 0
    second = capsys.readouterr().out
    for step in ("1/5 images: reusing", "2/5 vae: reusing", "4/5 train: reusing"):
        assert step in second
    shards = s["encode"]["shards"]
    assert f"{plural(shards, 'shard')} ({shards} from an earlier run)" in second  # nothing encoded twice
    assert second.count("(0 reused)") == 0 and "reused)" in second  # sample chunks kept
    assert json.loads((report / "summary.json").read_text())["latent_frechet_distance"] == pytest.approx(fd)

    # a demo of another size into the same folder is refused (its steps cannot be reused), one line
    assert main(["demo", "--quick", "--steps", "7", "--out", str(out), "--address", ray_address]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another size" in err and "--fresh" in err
