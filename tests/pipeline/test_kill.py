"""Exactly once: SIGKILL `sit encode` after some shards are committed, rerun with another worker count,
and get byte-for-byte the dataset of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from latents.format import CARD_NAME
from latents.storage import TEMP_MARK
from latents.verify import verify
from tests.pipeline.conftest import MICRO_BATCH, RESOLUTION, SHARD_SIZE, dataset_files


def _encode(src: str, dst: Path, vae: Path, address: str, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "cluster.cli", "encode", src, str(dst), "--vae", str(vae), "--address", address]
    args += ["--resolution", str(RESOLUTION), "--shard-size", str(SHARD_SIZE), "--micro-batch", str(MICRO_BATCH)]
    args += ["--max-reject-fraction", "0.05", "--quiet", *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _committed(dst: Path) -> list[str]:
    shards = dst / "shards"
    return sorted(p.name for p in shards.glob("*.tar")) if shards.is_dir() else []


@pytest.mark.slow
def test_sigkill_and_rerun_gives_the_uninterrupted_bytes(encoded_folder, sources, tiny_vae_dir, ray_address, tmp_path):
    src, dst = sources["imagefolder"][0], tmp_path / "killed"
    proc = _encode(src, dst, tiny_vae_dir, ray_address)
    deadline = time.time() + 120
    while len(_committed(dst)) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = _committed(dst)
    assert 3 <= len(committed) < 13, f"killed too late to test anything: {committed}"
    assert not (dst / CARD_NAME).exists()

    # the rerun adopts what is committed and encodes the rest with two encode actors instead of one
    rerun = _encode(src, dst, tiny_vae_dir, ray_address, "--workers", "2", "--cpus-per-worker", "0.5")
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    assert "200 encoded + 4 rejected = 204 source images" in out
    assert f"({len(committed)} from an earlier run)" in out or f"({len(committed) + 1} from an earlier run)" in out
    assert verify(str(dst)).ok
    files = dataset_files(str(dst))
    assert not [n for n in files if TEMP_MARK in n]
    assert files == dataset_files(encoded_folder.url)  # every shard, samples, manifest, rejects, card
