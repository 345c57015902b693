"""Exactly once: SIGKILL the whole `sit encode` job (its driver's process group) at a random point
while the workers write shards, on local disk and on S3; rerun (on local disk with another worker
count) and get byte-for-byte the dataset of the session's uninterrupted run (`encoded_folder`),
with exact counts, without rewriting any shard committed before the kill; orphans that a killed
worker leaves are swept. Only the killed job is a `sit encode` process of its own (SIGKILL needs
one); the rerun is the same job run in the test process, which is already connected to Ray."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

from latents.format import CARD_NAME
from latents.storage import TEMP_MARK
from latents.verify import verify
from latents.writer import SIDECAR_DIR
from pipeline.job import EncodeSummary, run_encode
from tests.conftest import wait_for_free_cpus
from tests.pipeline.conftest import MICRO_BATCH, RESOLUTION, SHARD_SIZE, dataset_files, encode_config

SHARDS = 13  # 204 inputs, 16 per shard


def _encode(src: str, dst: str, vae: Path, address: str, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "cluster.cli", "encode", src, dst, "--vae", str(vae), "--address", address]
    args += ["--resolution", str(RESOLUTION), "--shard-size", str(SHARD_SIZE), "--micro-batch", str(MICRO_BATCH)]
    args += ["--max-reject-fraction", "0.05", "--quiet", *extra]
    # its own process group: the kill takes the driver and every process it started
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _committed(dst: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(dst)
    fs.invalidate_cache()
    try:
        return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{path}/shards") if p.endswith(".tar"))
    except FileNotFoundError:
        return []


def _kill_at_random_point(src: str, dst: str, vae: Path, address: str) -> list[str]:
    """Run the job; SIGKILL its process group once a random number of shards is committed."""
    seed = int.from_bytes(os.urandom(4), "little")
    target = random.Random(seed).randint(1, SHARDS - 3)
    proc = _encode(src, dst, vae, address)
    deadline = time.time() + 300
    pause = 0.02 if "://" not in dst else 0.2  # a LIST a moment on the moto server takes CPU from the job
    while len(_committed(dst)) < target and proc.poll() is None and time.time() < deadline:
        time.sleep(pause)
    assert proc.poll() is None, f"the job ended before the kill: {proc.communicate()[1][-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = _committed(dst)
    assert target <= len(committed) < SHARDS, f"seed {seed}: killed at {committed}, wanted {target} shards"
    fs, path = fsspec.core.url_to_fs(dst)
    assert not fs.exists(f"{path}/{CARD_NAME}")
    return committed


def _rerun(src: str, dst: str, vae: Path, workers: int, committed: list[str]) -> EncodeSummary:
    """The same job again, in this process (already connected to the cluster: no second start of
    Python, torch and the driver's autoencoder), once the killed job's encode actor is gone."""
    wait_for_free_cpus()
    fsspec.core.url_to_fs(dst)[0].invalidate_cache()  # this process listed shards/ while the job ran
    # the rerun adopts what is committed and encodes the rest, with another number of encode actors
    summary = run_encode(
        encode_config(src, dst, vae, max_reject_fraction=0.05, workers=workers, cpus_per_worker=1 / workers)
    )
    assert (summary.source_images, summary.encoded, summary.rejected) == (204, 200, 4)  # exact counts
    # a killed worker may have committed one more after the count
    assert len(committed) <= summary.shards_adopted < SHARDS == summary.shards, summary.format()
    fsspec.core.url_to_fs(dst)[0].invalidate_cache()
    assert verify(dst).ok
    return summary


@pytest.mark.slow
def test_sigkill_and_rerun_gives_the_uninterrupted_bytes(encoded_folder, sources, tiny_vae_dir, ray_address, tmp_path):
    src, dst = sources["imagefolder"][0], tmp_path / "killed"
    committed = _kill_at_random_point(src, str(dst), tiny_vae_dir, ray_address)
    before = {n: (dst / "shards" / n).stat() for n in committed}
    # what a worker killed while publishing leaves: temporaries next to a committed and a pending shard
    orphans = [
        dst / "shards" / f"{committed[0]}{TEMP_MARK}0123456789ab",
        dst / SIDECAR_DIR / f"000012.json{TEMP_MARK}ab",
    ]
    for orphan in orphans:
        orphan.parent.mkdir(exist_ok=True)
        orphan.write_bytes(b"half a shard")

    _rerun(src, str(dst), tiny_vae_dir, 2, committed)
    for name, stat in before.items():  # committed before the kill: never written again
        after = (dst / "shards" / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), name
    assert not any(orphan.exists() for orphan in orphans)
    files = dataset_files(str(dst))
    assert not [n for n in files if TEMP_MARK in n]
    assert files == dataset_files(encoded_folder.url)  # every shard and sidecar, index, rejects, card


@pytest.mark.slow
def test_sigkill_and_rerun_on_s3(encoded_folder, sources, tiny_vae_dir, ray_address, s3_bucket):
    src, dst = sources["imagefolder"][0], f"{s3_bucket}/killed"
    committed = _kill_at_random_point(src, dst, tiny_vae_dir, ray_address)
    fs = fsspec.filesystem("s3")
    tags = {n: fs.info(f"{dst}/shards/{n}")["ETag"] for n in committed}
    _rerun(src, dst, tiny_vae_dir, 1, committed)
    fs.invalidate_cache()
    assert {n: fs.info(f"{dst}/shards/{n}")["ETag"] for n in committed} == tags
    local = dataset_files(encoded_folder.url)
    remote = {p[len(dst) - len("s3://") + 1 :]: fs.cat_file(p) for p in fs.find(dst)}
    assert sorted(remote) == sorted(local)
    for name, data in local.items():
        assert remote[name] == data, name  # the same bytes as the uninterrupted local run, card included
