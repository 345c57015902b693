"""Exact resume: runs interrupted by SIGKILL (and SIGTERM) at random steps end bitwise identical
to an uninterrupted run - model, EMA, optimizer, reader position and every generator - at world
size 1 and 2 (CPU, gloo, fp32 policy).

48 samples in batches of 8 give 6 steps per epoch; checkpoints every 7 steps therefore fall
mid-epoch (epoch 1 batch 1, epoch 2 batch 2, ...), and a kill between them resumes mid-epoch.
The interruption steps are drawn at random (the seed is printed on failure).
"""

from __future__ import annotations

import random
import signal
from pathlib import Path

import pytest

from tests.trainer.conftest import assert_identical, consolidated, interrupt_at, run, train_command, write_toy_dataset
from trainer.checkpoint import step_folder
from trainer.preempt import EXIT_PREEMPTED

TOTAL = 60
SETTINGS = (
    f"total_steps={TOTAL}",
    "checkpoint.every=7",
    "checkpoint.keep_last=10",
    "log.every=1",
    "data.global_batch_size=8",
)


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_killed_runs_resume_bitwise_identical(tmp_path, nproc):
    data = write_toy_dataset(str(tmp_path / "ds"), n=48)
    ref_dir = str(tmp_path / "reference")
    done = run(train_command(nproc, data, ref_dir, *SETTINGS))
    assert done.returncode == 0, done.stdout

    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    first, second = rng.randint(2, 20), rng.randint(25, 40)
    run_dir = str(tmp_path / "interrupted")
    command = train_command(nproc, data, run_dir, *SETTINGS)
    info = f"seed {seed}, kills after steps {first} and {second}"
    rc, out, seen = interrupt_at(command, run_dir, first, signal.SIGKILL)
    assert rc == -signal.SIGKILL and seen < TOTAL, f"{info}: rc {rc}, step {seen}\n{out}"
    rc, out, seen2 = interrupt_at(command, run_dir, max(second, seen + 1), signal.SIGKILL)
    assert rc == -signal.SIGKILL and seen2 < TOTAL, f"{info}: rc {rc}, step {seen2}\n{out}"
    done = run(command)
    assert done.returncode == 0, f"{info}\n{done.stdout}"
    assert "resumed from" in done.stdout

    final = step_folder(f"{run_dir}/checkpoints", TOTAL)
    reference = step_folder(f"{ref_dir}/checkpoints", TOTAL)
    assert_identical(consolidated(reference, tmp_path), consolidated(final, tmp_path))


@pytest.mark.slow
def test_sigterm_checkpoints_exits_75_and_resumes(tmp_path):
    data = write_toy_dataset(str(tmp_path / "ds"), n=48)
    ref_dir = str(tmp_path / "reference")
    assert run(train_command(1, data, ref_dir, *SETTINGS)).returncode == 0

    run_dir = str(tmp_path / "preempted")
    command = train_command(1, data, run_dir, *SETTINGS)
    rc, out, seen = interrupt_at(command, run_dir, 3, signal.SIGTERM)
    assert rc == EXIT_PREEMPTED, out
    assert "preempted" in out
    saved = sorted(Path(run_dir, "checkpoints").glob("step-*/COMPLETE.json"))
    stopped = int(saved[-1].parent.name.removeprefix("step-"))
    assert seen <= stopped < TOTAL  # the step in flight when the signal came, then a checkpoint
    done = run(command)
    assert done.returncode == 0, done.stdout
    assert f"resumed from {saved[-1].parent}" in done.stdout
    final = step_folder(f"{run_dir}/checkpoints", TOTAL)
    assert_identical(
        consolidated(step_folder(f"{ref_dir}/checkpoints", TOTAL), tmp_path), consolidated(final, tmp_path)
    )
