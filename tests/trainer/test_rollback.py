"""Spike and NaN rollback (trainer.rollback): the spike test, the skip of the data window, recovery from a
poisoned batch (the `rollback.test_poison_batch` hook), the limit, and a run killed after its rollback
that ends bitwise identical to the uninterrupted one (model, EMA, optimizer, every logged loss) at
world size 2 (CPU, gloo).

32 samples in batches of 8 give 4 steps per epoch, so the skipped windows cross epoch boundaries.
The poisoned batch and the kill step are drawn at random (the seed is in the failure message).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import time
from pathlib import Path

import pytest

from latents.reader import LatentDataset, LatentLoader
from tests.trainer.conftest import (
    assert_identical,
    consolidated,
    descendants,
    launch,
    run,
    tiny_config,
    train_command,
    write_toy_dataset,
)
from trainer.checkpoint import step_folder
from trainer.config import RollbackConfig, preset
from trainer.rollback import NONFINITE, SPIKE, RollbackLimitError, SpikeMonitor, advance
from trainer.train import train

TOTAL, EVERY, WINDOW = 30, 5, 4
SETTINGS = {
    "total_steps": TOTAL,
    "export": False,
    "data": {"global_batch_size": 8},
    "checkpoint": {"every": EVERY, "keep_last": 10},
    "log": {"every": 1},
    "rollback": {"enabled": True, "window": WINDOW, "spike_factor": 10},  # batches of 8: the loss varies +-50%
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return write_toy_dataset(str(tmp_path_factory.mktemp("toy") / "ds"), n=32)


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


def step_values(run_dir) -> dict[int, dict]:
    """The last logged loss values of every step (a resumed run logs the steps after its checkpoint again)."""
    out = {}
    for r in records(run_dir):
        if "loss" in r:
            out[r["step"]] = {k: v for k, v in r.items() if k.startswith("loss") or k in ("grad_norm", "images_seen")}
    return out


def rollbacks(run_dir) -> list[dict]:
    """The rollback events, each once (a run killed before its next checkpoint logs its rollback again)."""
    out = []
    for r in records(run_dir):
        if r.get("event") == "rollback":
            event = {k: v for k, v in r.items() if k != "time"}
            if event not in out:
                out.append(event)
    return out


def unplaced(events: list[dict]) -> list[dict]:
    """Rollback events without the fields that name the run's own directory or the metrics line."""
    return [{k: v for k, v in e.items() if k not in ("checkpoint", "step", "time")} for e in events]


def test_released_presets_have_rollback_off():
    assert not preset("sit-xl2-256").rollback.enabled and not preset("tiny-cpu").rollback.enabled


def test_spike_monitor():
    monitor = SpikeMonitor(RollbackConfig(enabled=True, window=3, spike_factor=2.0))
    assert monitor.check(math.nan, True) == NONFINITE and monitor.check(1.0, False) == NONFINITE
    for loss in (1.0, 3.0):
        monitor.accept(loss)
    assert monitor.check(100.0, True) is None  # the window is not full yet
    monitor.accept(2.0)  # median 2
    assert monitor.check(4.0, True) is None and monitor.check(4.001, True) == SPIKE
    monitor.accept(10.0)  # the window is 3, 2, 10: median 3
    assert monitor.check(6.0, True) is None and monitor.check(6.5, True) == SPIKE
    restored = SpikeMonitor(monitor.config)
    restored.load_state_dict(monitor.state_dict())
    assert list(restored.losses) == [3.0, 2.0, 10.0] and restored.median() == 3.0
    assert SpikeMonitor(RollbackConfig()).check(math.nan, False) is None  # off: the non-finite skip applies


def test_advance_skips_batches_across_epochs(data):
    def loader():
        return LatentLoader(LatentDataset(data, batch_size=8, rank=0, world_size=1, seed=0))

    def take(it: LatentLoader, n: int) -> list[list[str]]:
        out = []
        while len(out) < n:
            for batch in it:
                out.append(batch["keys"])
                if len(out) == n:
                    break
        return out

    read, skipped = loader(), loader()
    take(read, 6)  # 4 batches an epoch: into the second
    advance(skipped, 6)
    assert skipped.state_dict() == read.state_dict()
    assert take(skipped, 3) == take(read, 3)


def test_nan_batch_rolls_back_and_the_run_finishes(tmp_path, data):
    run_dir = tmp_path / "run"
    poison = {"test_poison_batch": 12, "test_poison_factor": math.nan}
    config = tiny_config(data, str(run_dir), **{**SETTINGS, "rollback": {**SETTINGS["rollback"], **poison}})
    result = train(config)
    assert result.exit_code == 0 and result.step == TOTAL and result.nonfinite_steps == 0
    [event] = rollbacks(run_dir)
    assert event == {
        **event,
        "step": 12,
        "reason": NONFINITE,
        "checkpoint": step_folder(f"{run_dir}/checkpoints", 10),
        "to_step": 10,
        "skipped_batches": [11, 12],
        "rollbacks": 1,
    }
    assert math.isnan(event["spike_loss"]) and math.isnan(result.rollbacks[0]["spike_loss"])
    assert [{k: v for k, v in r.items() if k != "spike_loss"} for r in result.rollbacks] == [
        {k: v for k, v in event.items() if k not in ("step", "spike_loss")}
    ]
    assert all(math.isfinite(v["loss"]) for v in step_values(run_dir).values())
    assert sorted(step_values(run_dir)) == list(range(1, TOTAL + 1))


def test_spike_after_max_rollbacks_stops_with_one_line(tmp_path, data):
    rollback = {**SETTINGS["rollback"], "test_poison_batch": 7, "max_rollbacks": 0}
    config = tiny_config(data, str(tmp_path / "run"), **{**SETTINGS, "rollback": rollback})
    with pytest.raises(RollbackLimitError) as err:
        train(config)
    message = str(err.value)
    assert message.startswith("step 7: loss ") and "x running median" in message and "\n" not in message
    assert "after 0 rollbacks (rollback.max_rollbacks=0)" in message


def kill_after_rollback(command: list[str], run_dir: str, step: int, timeout: float = 240) -> tuple[int, str]:
    """Start ``command``; SIGKILL the whole job once a step >= ``step`` is logged after a rollback."""
    proc = launch(command)
    deadline = time.monotonic() + timeout
    path = Path(run_dir) / "metrics.jsonl"
    while proc.poll() is None and time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        after = False
        for line in lines:
            with contextlib.suppress(json.JSONDecodeError):  # a line being written
                r = json.loads(line)
                after = after or r.get("event") == "rollback"
                if after and "loss" in r and r["step"] >= step:
                    for pid in [proc.pid, *descendants(proc.pid)]:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    break
        time.sleep(0.005)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


@pytest.mark.slow
def test_poisoned_batch_recovers_and_a_run_killed_after_its_rollback_ends_bitwise_equal(tmp_path, data):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    poison = rng.randint(WINDOW + 2, 20)  # once the loss window is full
    back = (poison - 1) // EVERY * EVERY  # the newest checkpoint before the spike (step 0 is saved at the start)
    kill = rng.randint(back + 1, TOTAL - 2)
    info = f"seed {seed}: poisoned batch {poison}, killed at step {kill} after the rollback"
    overrides = [
        f"total_steps={TOTAL}",
        "export=false",
        "data.global_batch_size=8",
        f"checkpoint.every={EVERY}",
        "checkpoint.keep_last=10",
        "log.every=1",
        "rollback.enabled=true",
        f"rollback.window={WINDOW}",
        "rollback.spike_factor=10",
        f"rollback.test_poison_batch={poison}",
    ]
    ref_dir = str(tmp_path / "reference")
    done = run(train_command(2, data, ref_dir, *overrides))
    assert done.returncode == 0, f"{info}\n{done.stdout}"
    [event] = rollbacks(ref_dir)
    assert (event["step"], event["reason"], event["to_step"]) == (poison, SPIKE, back), info
    assert event["skipped_batches"] == [back + 1, poison] and event["spike_loss"] > 1e6, info
    assert f"rollback 1: spike at step {poison}" in done.stdout
    assert sorted(step_values(ref_dir)) == list(range(1, TOTAL + 1))

    run_dir = str(tmp_path / "killed")
    command = train_command(2, data, run_dir, *overrides)
    rc, out = kill_after_rollback(command, run_dir, kill)
    assert rc == -signal.SIGKILL, f"{info}: rc {rc}\n{out}"
    done = run(command)
    assert done.returncode == 0, f"{info}\n{done.stdout}"
    assert "resumed from" in done.stdout and f"rollback 1: spike at step {poison}" in done.stdout, info
    final, reference = step_folder(f"{run_dir}/checkpoints", TOTAL), step_folder(f"{ref_dir}/checkpoints", TOTAL)
    a, b = consolidated(reference, tmp_path), consolidated(final, tmp_path)
    for key in [k for k in a if k.endswith(".rollback.events")]:  # the same but for the run directory
        assert unplaced(a.pop(key)) == unplaced(b.pop(key)) == unplaced([event]), info
    assert_identical(a, b)
    assert step_values(run_dir) == step_values(ref_dir), info
    assert unplaced(rollbacks(run_dir)) == unplaced([event]), info
