"""The bulk sampling job on the session's local Ray cluster (acceptance 1, 2 and 4 of issue 9).

One uninterrupted reference run (1 worker, batch 4, chunks of 4) is compared byte for byte with
runs that differ in what must not matter: worker count and batch size, chunk size after a
SIGKILL of the driver and a rerun, the output store (moto S3).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import fsspec
import numpy as np
import pytest

from sampling.generate import Generator, ModelSource
from sampling.job import SampleJob, SampleJobError, run_sample_job
from sampling.options import SamplerOptions
from sampling.output import RunMismatchError
from sampling.plan import ClassPolicy, SamplePlan
from tests.conftest import wait_for_free_cpus
from tests.sampling.conftest import NAN_CLASS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
N = 12  # samples
STEPS = 30  # SDE steps: enough that a chunk takes a moment, so the kill lands mid-run
OPTIONS = SamplerOptions(num_steps=STEPS, cfg_scale=2.0)


def make_job(export: str, vae: Path, out: str, **overrides) -> SampleJob:
    job = SampleJob(
        source=ModelSource(export, str(vae)),
        out=out,
        options=OPTIONS,
        num_samples=N,
        seed=7,
        chunk_size=4,
        batch_size=4,
        workers=1,
        progress=False,
    )
    return replace(job, **overrides)


def tar_names(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def npz_arrays(url: str) -> tuple[np.ndarray, np.ndarray]:
    with fsspec.open(url, "rb") as f, np.load(f) as data:
        return data["arr_0"], data["arr_1"]


@pytest.fixture(scope="module")
def reference(ray_address, tiny_export, tiny_vae_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "out"
    run_sample_job(make_job(tiny_export, tiny_vae_dir, str(out)))
    return out


def test_npz_shape_order_and_labels(reference, tiny_export, tiny_vae_dir):
    images, labels = npz_arrays(str(reference / "samples.npz"))
    assert images.shape == (N, 64, 64, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.load(reference / "labels.npy"), labels)
    plan = SamplePlan(7, N, 10, ClassPolicy.UNIFORM)
    _, expected_labels, _ = plan.start(range(N), (4, 8, 8))
    np.testing.assert_array_equal(labels, expected_labels.numpy())
    assert len(set(labels.tolist())) > 1  # uniform random classes, not one class
    # sample order: rows 0 and N-1 are samples 0 and N-1, generated here directly in this process
    direct = Generator(ModelSource(tiny_export, str(tiny_vae_dir))).generate(OPTIONS, plan, [0, N - 1], 2)
    np.testing.assert_array_equal(images[[0, N - 1]], direct.images)
    names = tar_names(reference / "chunks" / "chunk-000001.tar")
    assert names == [f"{i:08d}.{ext}" for i in range(4, 8) for ext in ("png", "cls")]


def test_workers_and_batch_size_do_not_change_bytes(reference, tiny_export, tiny_vae_dir, tmp_path):
    out = tmp_path / "out"
    run_sample_job(make_job(tiny_export, tiny_vae_dir, str(out), workers=2, batch_size=3))
    for name in ("samples.npz", "labels.npy", "chunks/chunk-000000.tar", "chunks/chunk-000002.tar"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_rerun_skips_committed_and_refuses_another_run(reference, tiny_export, tiny_vae_dir):
    before = (reference / "samples.npz").read_bytes()
    summary = run_sample_job(make_job(tiny_export, tiny_vae_dir, str(reference)))
    assert (summary.skipped, summary.sampled) == (3, 0)
    assert (reference / "samples.npz").read_bytes() == before
    with pytest.raises(RunMismatchError, match=r"seed: there 7, now 8"):
        run_sample_job(make_job(tiny_export, tiny_vae_dir, str(reference), seed=8))
    assert (reference / "samples.npz").read_bytes() == before


def test_output_on_s3_is_the_same(reference, tiny_export, tiny_vae_dir, s3_bucket):
    out = f"{s3_bucket}/samples"
    run_sample_job(make_job(tiny_export, tiny_vae_dir, out))
    fs = fsspec.filesystem("s3")
    for name in ("samples.npz", "labels.npy", "chunks/chunk-000001.tar"):
        assert fs.cat_file(f"{out}/{name}") == (reference / name).read_bytes(), name


def _sample_cli(export: str, vae: Path, out: Path, address: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cluster.cli",
        "sample",
        export,
        str(out),
        "--vae",
        str(vae),
        "--num-samples",
        str(N),
        "--seed",
        "7",
        "--steps",
        str(STEPS),
        "--cfg-scale",
        "2",
        "--chunk-size",
        "2",
        "--batch-size",
        "1",
        "--workers",
        "1",
        "--address",
        address,
        "--quiet",
    ]


def test_sigkill_driver_then_rerun(reference, ray_address, tiny_export, tiny_vae_dir, tmp_path):
    out = tmp_path / "out"
    cmd = _sample_cli(tiny_export, tiny_vae_dir, out, ray_address)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    chunks = out / "chunks"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if chunks.exists() and any(p.suffix == ".tar" for p in chunks.iterdir()):
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"sit sample ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    committed = sorted(p.name for p in chunks.iterdir() if p.suffix == ".tar")
    assert 1 <= len(committed) < 6, committed
    assert not (out / "samples.npz").exists()

    # the same job again, in this process (on Ray already), once Ray has ended the killed job's actor
    wait_for_free_cpus()
    summary = run_sample_job(make_job(tiny_export, tiny_vae_dir, str(out), chunk_size=2, batch_size=1))
    assert summary.skipped >= len(committed)  # (the killed job's actor may have added one before it ended)
    tars = sorted(p.name for p in chunks.iterdir())
    assert tars == [f"chunk-{c:06d}.tar" for c in range(6)]  # no temporaries, no extra chunk
    keys = [n for t in tars for n in tar_names(chunks / t) if n.endswith(".png")]
    assert keys == [f"{i:08d}.png" for i in range(N)]  # every sample exactly once
    # chunks of 2 and batches of 1 here, chunks of 4 and batches of 4 in the reference: same images
    images, labels = npz_arrays(str(out / "samples.npz"))
    ref_images, ref_labels = npz_arrays(str(reference / "samples.npz"))
    np.testing.assert_array_equal(images, ref_images)
    np.testing.assert_array_equal(labels, ref_labels)


def test_nan_chunk_fails_named_and_is_not_published(ray_address, nan_export, tiny_vae_dir, tmp_path):
    out = tmp_path / "out"
    classes = (0, 1, 2, 4, 5, NAN_CLASS, 6, 7)  # NAN_CLASS only in chunk 1
    job = make_job(nan_export, tiny_vae_dir, str(out), num_samples=8, class_policy=ClassPolicy.LIST, classes=classes)
    with pytest.raises(
        SampleJobError, match=r"chunk-000001\.tar: NonFiniteSamplesError: NaN/Inf latents in samples \[5\]"
    ):
        run_sample_job(job)
    assert sorted(p.name for p in (out / "chunks").iterdir()) == ["chunk-000000.tar"]
    assert not (out / "samples.npz").exists()


def test_released_checkpoint_end_to_end(ray_address, reference_dir, tiny_vae_dir, tmp_path):
    out = tmp_path / "out"
    source = ModelSource(str(reference_dir / "released_sit_tiny" / "state_dict.pt"), str(tiny_vae_dir), num_heads=4)
    options = SamplerOptions(num_steps=10, cfg_scale=1.5, guided_channels=3)
    summary = run_sample_job(make_job("", tiny_vae_dir, str(out), source=source, options=options, num_samples=4))
    assert summary.sampled == 4
    images, labels = npz_arrays(str(out / "samples.npz"))
    assert images.shape == (4, 64, 64, 3) and labels.max() < 1000
