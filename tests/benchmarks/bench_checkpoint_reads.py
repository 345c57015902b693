"""Checkpoint bytes read per rank: `sit train` at 2 ranks (torchrun, gloo, CPU) saving a checkpoint and
resuming from it, with the checkpoints on the counting fsspec file system of
tests/trainer/count_reads.py. Prints one JSON line per (phase, rank): bytes read from the checkpoint
folder, and the checkpoint's size.

    python -m tests.benchmarks.bench_checkpoint_reads [--tree OTHER_CHECKOUT]

``--tree`` runs another checkout's trainer (e.g. main, for a side-by-side figure) with this
checkout's counting file system on its path.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default=str(ROOT), help="the checkout whose trainer runs (default: this one)")
    args = parser.parse_args()
    tree = Path(args.tree).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, str(ROOT))
        from tests.trainer.conftest import write_toy_dataset

        data = write_toy_dataset(f"{tmp}/ds", n=32)
        probe = Path(tmp, "probe")
        shutil.copytree(ROOT / "tests", probe / "tests", ignore=shutil.ignore_patterns("__pycache__", "results"))
        run_dir = f"{tmp}/run"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{tree}:{probe}", "PYTHONDONTWRITEBYTECODE": "1"}
        flags = ["--preset", "tiny-cpu", "--data", data, "--run-dir", run_dir]
        for o in ("log.tensorboard=false", "log.progress=false", "data.global_batch_size=8", "export=false"):
            flags += ["--set", o]
        flags += ["--set", f"checkpoint.url=counting://{run_dir}/checkpoints", "--set", "checkpoint.every=3"]
        folder = Path(run_dir, "checkpoints", "step-000000003")
        common = {"date": str(date.today()), "machine": platform.machine(), "tree": str(tree), "world_size": 2}
        for phase, steps in (("save", 3), ("resume", 4)):
            out = Path(tmp, phase)
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
            command += ["-m", "tests.trainer.count_reads", str(out), *flags, "--set", f"total_steps={steps}"]
            done = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(done.stdout + done.stderr)
            size = sum(p.stat().st_size for p in folder.iterdir())
            for rank in (0, 1):
                reads = json.loads((out / f"reads-{rank}.json").read_text())
                got = sum(n for p, n in reads.items() if Path(p).parent == folder)
                record = {"figure": f"checkpoint_bytes_read_{phase}", "rank": rank, "value": got}
                print(json.dumps({**record, "checkpoint_bytes": size, **common}))


if __name__ == "__main__":
    main()
