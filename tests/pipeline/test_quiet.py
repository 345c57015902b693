"""What `sit encode` prints: its summary on stdout and nothing from Ray; one line when it fails.

Run in this process with ``capfd``, so that the driver's own file descriptors are captured: Ray's
core worker writes its error-level lines to fd 2 from C++, below any Python logging. Ray's Python
log lines (Ray Data's execution plan, ...) go to the log file of `pipeline.ray_jobs`.
"""

from __future__ import annotations

from pathlib import Path

from cluster.cli import main
from pipeline.synthetic import synthetic_images, write_imagefolder


def test_quiet_encode_prints_its_summary_and_no_ray_line(
    ray_address, sources, tiny_vae_dir, tmp_path, capfd, monkeypatch
):
    monkeypatch.setenv("SIT_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setattr("pipeline.ray_jobs._LOG_FILE", None)  # a fresh log file under SIT_LOG_DIR
    src, dst = sources["imagefolder"][0], str(tmp_path / "latents")
    argv = ["encode", src, dst, "--resolution", "32", "--vae", str(tiny_vae_dir), "--limit", "16"]
    assert main([*argv, "--micro-batch", "8", "--address", ray_address, "--quiet"]) == 0
    out, err = capfd.readouterr()
    assert err == "", err  # no core_worker.cc line, no Ray Data INFO lines, no warnings
    assert out.count("\n") == 1 and "16 encoded + 0 rejected = 16 source images" in out and "1 shard " in out, out
    logs = list((tmp_path / "logs").glob("ray-*.log"))
    assert logs and "Starting execution of Dataset" in logs[0].read_text()  # Ray Data's INFO lines, in its log file


def test_every_input_rejected_is_said_in_one_line(ray_address, tiny_vae_dir, tmp_path, capfd):
    src = tmp_path / "broken"
    images = [im for im in synthetic_images(num_classes=1, per_class=1, broken=3) if im.broken]
    write_imagefolder(str(src), images)
    dst = tmp_path / "latents"
    argv = ["encode", str(src), str(dst), "--resolution", "32", "--vae", str(tiny_vae_dir), "--address", ray_address]
    assert main(argv) == 1
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and f"all {len(images)} inputs were rejected" in err, err
    assert "rejects.parquet" in err and "hole" not in err and "{" not in err  # counts in words, not a dict
    assert not (Path(dst) / "card.json").exists()
