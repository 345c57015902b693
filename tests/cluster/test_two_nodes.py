"""The multi-node launcher for real: two local "nodes" (two cluster/train/launch.sh, one rank
each, c10d rendezvous on 127.0.0.1, gloo) train, checkpoint, lose a node to SIGKILL and resume.

After the kill, the surviving node's collectives fail, its launch.sh restarts torchrun, which
waits in the rendezvous; the killed node is started again (as a scheduler would) and both
resume from the newest complete checkpoint and finish the run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.moto_s3 import free_port
from tests.trainer.conftest import write_toy_dataset

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "cluster" / "train" / "launch.sh"
TOTAL_STEPS = 300
EVERY = 20


def start_node(index: int, port: int, data: str, ckpt: str, run_dir: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env.update(
        NNODES="2",
        NPROC_PER_NODE="1",
        RDZV_ENDPOINT=f"127.0.0.1:{port}",
        RDZV_CONF=f"is_host={int(index == 0)}",
        RUN_ID="two-nodes",
        MAX_FAILURES="3",
        RESTART_DELAY="1",
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
    )
    args = ["--preset", "tiny-cpu", "--data", data, "--run-dir", str(run_dir), "--steps", str(TOTAL_STEPS)]
    for kv in (f"checkpoint.url={ckpt}", f"checkpoint.every={EVERY}", "log.tensorboard=false", "log.progress=false"):
        args += ["--set", kv]
    with open(log, "ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            ["bash", str(LAUNCH), *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its ranks in sessions of their own, so a
    process-group kill would miss them)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def kill_node(node: subprocess.Popen) -> None:
    """SIGKILL a "node": its launch.sh, torchrun agent and ranks at once, as a lost machine."""
    for pid in [node.pid, *descendants(node.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    node.wait(10)


def complete_steps(ckpt: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in ckpt.glob("step-*/COMPLETE.json"))


@pytest.mark.slow
def test_two_nodes_survive_losing_one(tmp_path):
    data = write_toy_dataset(str(tmp_path / "data"), n=64)
    ckpt = tmp_path / "ckpt"
    port = free_port()
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    nodes = [start_node(i, port, data, str(ckpt), tmp_path / f"run{i}", logs[i]) for i in range(2)]
    try:
        deadline = time.time() + 180
        while not complete_steps(ckpt):
            assert time.time() < deadline, "no checkpoint within 180 s:\n" + logs[0].read_text()[-3000:]
            assert nodes[1].poll() is None, logs[1].read_text()[-3000:]
            time.sleep(0.05)
        kill_node(nodes[1])  # node 1 is lost: launch.sh, torchrun and its rank
        killed_after = complete_steps(ckpt)[-1]
        assert killed_after < TOTAL_STEPS, "the run finished before the kill: make it longer"
        time.sleep(1)
        nodes[1] = start_node(1, port, data, str(ckpt), tmp_path / "run1", logs[1])  # the scheduler restarts it
        for i, node in enumerate(nodes):
            assert node.wait(240) == 0, f"node {i}:\n" + logs[i].read_text()[-4000:]
    finally:
        for node in nodes:
            if node.poll() is None:
                kill_node(node)

    assert "restarting" in logs[0].read_text(), "node 0 should have restarted torchrun after losing node 1"
    assert complete_steps(ckpt)[-1] == TOTAL_STEPS
    # whichever node got rank 0 in the last rendezvous wrote the metrics and the export
    events = [
        json.loads(line)
        for run in ("run0", "run1")
        if (tmp_path / run / "metrics.jsonl").exists()
        for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
    ]
    resumed = [e for e in events if e.get("event") == "resumed"]
    assert resumed, "the restarted run must resume from a checkpoint"
    assert int(resumed[-1]["from"].rstrip("/").split("-")[-1]) >= killed_after
    assert any((tmp_path / run / "ema.safetensors").exists() for run in ("run0", "run1"))


@pytest.mark.slow
def test_sigterm_to_the_launcher_checkpoints_and_exits_75(tmp_path):
    """As Kubernetes stops a pod: SIGTERM to launch.sh only; the rank writes a checkpoint and
    launch.sh exits 75 (resuming from it is tested in tests/trainer/test_resume.py)."""
    data = write_toy_dataset(str(tmp_path / "data"), n=64)
    ckpt, log = tmp_path / "ckpt", tmp_path / "node.log"
    env = dict(
        os.environ,
        NNODES="1",
        NPROC_PER_NODE="1",
        RDZV_ENDPOINT=f"127.0.0.1:{free_port()}",
        PYTHON=sys.executable,
        PYTHONPATH=str(ROOT),
    )
    args = ["--preset", "tiny-cpu", "--data", data, "--run-dir", str(tmp_path / "run"), "--steps", "100000"]
    for kv in (f"checkpoint.url={ckpt}", "checkpoint.every=100000", "log.tensorboard=false", "log.progress=false"):
        args += ["--set", kv]
    with open(log, "ab") as out:
        node = subprocess.Popen(["bash", str(LAUNCH), *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.time() + 120
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):  # training has started
            assert time.time() < deadline and node.poll() is None, log.read_text()[-3000:]
            time.sleep(0.05)
        node.send_signal(signal.SIGTERM)
        assert node.wait(120) == 75, log.read_text()[-3000:]
    finally:
        if node.poll() is None:
            kill_node(node)
    steps = complete_steps(ckpt)
    assert len(steps) == 1 and 0 < steps[0] < 100000  # the checkpoint the stop wrote, nothing else
    assert "exiting 75 to be requeued" in log.read_text()
