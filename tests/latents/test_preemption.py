"""A writer killed anywhere (SIGKILL, locally and on a real S3 API), then rerun: the dataset
completes, verifies with no warning, and is byte-identical to one written without interruption."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from latents.storage import TEMP_MARK, Root
from latents.verify import verify

ROOT = Path(__file__).resolve().parents[2]


def run_writer(url: str, kill_at: int = -1) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tests.latents.kill_writer", url, "--kill-at", str(kill_at)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def contents(url: str) -> dict[str, bytes]:
    root = Root(url, {"skip_instance_cache": True} if url.startswith("s3://") else None)
    return {name: root.read_bytes(name) for name in root.list("")}


def kill_and_rerun(reference: str, base: str, seeds: list[int]) -> int:
    """Kill a writer at a random call of latents/storage.py per seed, rerun, compare; returns how
    many kills left a temporary file behind."""
    left_temporaries = 0
    done = run_writer(reference)
    assert done.returncode == 0, done.stderr
    calls = int(done.stdout.split()[-1])
    expected = contents(reference)
    for seed in seeds:
        url = f"{base}/run-{seed}"
        kill_at = int(np.random.default_rng(seed).integers(calls))
        killed = run_writer(url, kill_at)
        assert killed.returncode == -signal.SIGKILL, (kill_at, killed.stderr)
        left_temporaries += any(TEMP_MARK in name for name in contents(url))
        rerun = run_writer(url)
        assert rerun.returncode == 0, (kill_at, rerun.stderr)
        report = verify(url, storage_options={"skip_instance_cache": True} if url.startswith("s3://") else None)
        assert report.ok and not report.warnings, (kill_at, report.problems, report.warnings)
        assert contents(url) == expected, f"killed at call {kill_at} of {calls}: not byte-identical"
    return left_temporaries


@pytest.mark.slow
def test_killed_local_writer_reruns_to_the_same_bytes(tmp_path):
    left = kill_and_rerun(str(tmp_path / "reference"), str(tmp_path), seeds=list(range(8)))
    assert left >= 1  # the seeds include deaths between writing a temporary and renaming it


@pytest.mark.slow
def test_killed_s3_writer_reruns_to_the_same_bytes(s3_bucket):
    left = kill_and_rerun(f"{s3_bucket}/reference", s3_bucket, seeds=list(range(5)))
    assert left == 0  # object stores get one write to the final key: nothing temporary exists
