"""Credentials given through the environment never reach logs, saved configs or checkpoints.

`sit train` reads its data from and writes its checkpoints to the moto S3 server with an access
key and secret that exist only in its environment; then every byte it left behind - its output,
the run directory (config.json, metrics.jsonl, the EMA export) and every checkpoint object in
the bucket - is searched for them. As a control, the same search must find the bucket name,
which those files do hold.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import s3fs

from tests.trainer.conftest import write_toy_dataset

ROOT = Path(__file__).resolve().parents[2]


def occurrences(needle: str, blobs: dict[str, bytes]) -> list[str]:
    return [name for name, data in blobs.items() if needle.encode() in data]


@pytest.mark.slow
def test_no_credential_is_written_anywhere(tmp_path, s3_bucket):
    key_id, secret = f"AKIA{uuid.uuid4().hex[:16].upper()}", f"secret-{uuid.uuid4().hex}"
    data = write_toy_dataset(f"{s3_bucket}/data", n=32)
    run_dir = tmp_path / "run"
    env = dict(os.environ, AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret, PYTHONPATH=str(ROOT))
    args = ["--preset", "tiny-cpu", "--data", data, "--run-dir", str(run_dir), "--steps", "6"]
    for kv in (f"checkpoint.url={s3_bucket}/ckpt", "checkpoint.every=3", "log.tensorboard=false", "log.every=1"):
        args += ["--set", kv]
    result = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "train", *args], capture_output=True, env=env, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]

    blobs = {"stdout": result.stdout, "stderr": result.stderr}
    blobs.update({str(p): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()})
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    objects = [p for p in fs.find(s3_bucket.removeprefix("s3://")) if "/ckpt/" in p]
    assert any(p.endswith("COMPLETE.json") for p in objects), objects
    blobs.update({f"s3://{p}": fs.cat_file(p) for p in objects})
    assert str(run_dir / "config.json") in blobs and str(run_dir / "ema.safetensors") in blobs

    assert occurrences(s3_bucket.removeprefix("s3://"), blobs), "control: the search must find the bucket name"
    assert occurrences(secret, blobs) == []
    assert occurrences(key_id, blobs) == []


def test_ray_workers_get_storage_settings_but_no_secrets(monkeypatch):
    from pipeline.ray_jobs import worker_env

    for name, value in {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_REGION": "eu-west-1",
        "AWS_PROFILE": "research",
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t",
        "AWS_SESSION_TOKEN": "t0ken",
        "GOOGLE_APPLICATION_CREDENTIALS": "/keys/sa.json",
        "HF_HOME": "/models/hf",
        "HF_TOKEN": "hf_t0ken",
    }.items():
        monkeypatch.setenv(name, value)
    env = worker_env()
    assert {"AWS_ENDPOINT_URL", "AWS_REGION", "AWS_PROFILE", "HF_HOME"} <= set(env)
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN"} & set(env)
    assert "GOOGLE_APPLICATION_CREDENTIALS" not in env


@pytest.mark.slow
def test_encode_job_writes_no_credential(tmp_path, s3_bucket, ray_address, tiny_vae_dir):
    """`sit encode` to S3 on the Ray cluster, with secrets in its environment only: neither its
    output, its dataset files nor any Ray log of the session holds them."""
    from pipeline.synthetic import synthetic_images, write_imagefolder

    src = tmp_path / "images"
    write_imagefolder(str(src), synthetic_images(num_classes=2, per_class=4, broken=0))
    dst = f"{s3_bucket}/latents"
    key_id, secret = f"AKIA{uuid.uuid4().hex[:16].upper()}", f"secret-{uuid.uuid4().hex}"
    env = dict(os.environ, AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret, PYTHONPATH=str(ROOT))
    args = ["encode", str(src), dst, "--vae", str(tiny_vae_dir), "--resolution", "64", "--address", ray_address]
    result = subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args, "--quiet"], capture_output=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]

    blobs = {"stdout": result.stdout, "stderr": result.stderr}
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    blobs.update({f"s3://{p}": fs.cat_file(p) for p in fs.find(dst.removeprefix("s3://"))})
    assert any(name.endswith("card.json") for name in blobs)
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    log_files = {str(p): p.read_bytes() for p in logs.rglob("*") if p.is_file()}
    assert len(log_files) > 5, f"no Ray logs found in {logs}"
    blobs.update(log_files)
    assert occurrences(s3_bucket.removeprefix("s3://"), blobs), "control: the search must find the bucket name"
    assert occurrences(secret, blobs) == []
    assert occurrences(key_id, blobs) == []


@pytest.mark.slow
def test_wandb_files_hold_no_credential(tmp_path):
    """`sit train` with W&B offline and a W&B API key and cloud secrets in its environment: no
    file of the run directory (the W&B transaction log, its debug logs, media and metadata
    included) nor the output holds them."""
    data = write_toy_dataset(str(tmp_path / "data"), n=32)
    run_dir = tmp_path / "run"
    secrets = {
        "WANDB_API_KEY": uuid.uuid4().hex + uuid.uuid4().hex[:8],
        "AWS_SECRET_ACCESS_KEY": f"secret-{uuid.uuid4().hex}",
        "AWS_ACCESS_KEY_ID": f"AKIA{uuid.uuid4().hex[:16].upper()}",
    }
    env = dict(os.environ, PYTHONPATH=str(ROOT), **secrets)
    project = f"project-{uuid.uuid4().hex[:8]}"
    args = ["--preset", "tiny-cpu", "--data", data, "--run-dir", str(run_dir), "--steps", "4"]
    for kv in ("log.wandb=true", "log.wandb_mode=offline", f"log.wandb_project={project}", "log.every=1"):
        args += ["--set", kv]
    args += ["--set", "log.sample_every=4", "--set", "log.tensorboard=false"]
    result = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "train", *args], capture_output=True, env=env, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    blobs = {"stdout": result.stdout, "stderr": result.stderr}
    blobs.update({str(p): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()})
    wandb_files = [name for name in blobs if "/wandb/" in name]
    assert any(name.endswith(".wandb") for name in wandb_files) and len(wandb_files) >= 3, wandb_files
    assert occurrences(project, blobs), "control: the search must find the W&B project name"
    for value in secrets.values():
        assert occurrences(value, blobs) == []
