"""The training loop's speed in two checkouts, side by side: this one and ``--base`` (e.g. main's).

Each round runs ``python -m trainer.train`` (world size 1, one torch thread, evaluation off, no
export, no TensorBoard) in each checkout in turn, alternating which goes first, on the same
dataset and model as `bench_train` (SiT depth 4, hidden 256, 4x16x16 latents, batch 16); the
figure of a run is the median of its metrics lines' images/s (windows of 10 steps, the first two
dropped as warm-up). The machine is shared, so the comparison is of the medians over rounds.
Prints one JSON line per checkout and the ratio.

    python -m tests.benchmarks.bench_train_ab --base /tmp/main-checkout [--rounds 3 --steps 200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

from tests.benchmarks.bench_train import BATCH, MODEL, SHAPE, write_data

ROOT = Path(__file__).resolve().parents[2]


def run_once(tree: Path, data: str, run_dir: str, steps: int) -> float:
    args = [sys.executable, "-m", "trainer.train", "--preset", "tiny-cpu", "--data", data, "--run-dir", run_dir]
    args += ["--steps", str(steps)]
    sets = {f"model.{k}": v for k, v in MODEL.items()} | {
        "data.global_batch_size": BATCH,
        "data.num_workers": 0,
        "optim.lr": 1e-4,
        "log.every": 10,
        "log.tensorboard": "false",
        "log.progress": "false",
        "checkpoint.every": 10**9,
        "export": "false",
    }
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
    subprocess.run(args, cwd=tree, env=env, check=True, capture_output=True)
    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["images_per_s"] for r in lines if "images_per_s" in r][2:]
    return statistics.median(speeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="another checkout to compare with (e.g. main's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    trees = {"this": ROOT, "base": Path(args.base).resolve()}
    speeds: dict[str, list[float]] = {"this": [], "base": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/ds"
        write_data(data, BATCH * 24)
        for r in range(args.rounds):
            order = ["this", "base"] if r % 2 == 0 else ["base", "this"]
            for name in order:
                speeds[name].append(run_once(trees[name], data, f"{tmp}/run-{name}-{r}", args.steps))
    common = {"date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "batch": BATCH}
    common |= {"shape": list(SHAPE), "steps": args.steps, "rounds": args.rounds}
    medians = {k: statistics.median(v) for k, v in speeds.items()}
    for name, value in medians.items():
        print(json.dumps({"figure": f"images_per_s_{name}", "value": round(value, 1), "runs": speeds[name], **common}))
    print(json.dumps({"figure": "ratio_this_over_base", "value": round(medians["this"] / medians["base"], 4)}))


if __name__ == "__main__":
    main()
