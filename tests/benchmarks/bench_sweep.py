"""`sit sweep --paper` on the demo's data (issue 16, acceptance 3): wall time and latent FD per row.

Builds (or reuses) the demo's images, fitted VAE and latents in OUT/data with `sit demo`'s own
steps (`cluster.demo_steps`, full size: 2,400 images of 6 classes, 4x8x8 latents), then runs

    sit sweep --paper --preset tiny-cpu --data OUT/data/latents --vae OUT/data/vae --out OUT/sweep
        --steps STEPS --set <the demo's model: depth 4, hidden 128, 6 classes, lr 1e-3, EMA 0.995,
        batch 64> --num-samples N --sample-steps K

in a subprocess (9 trainings x 6 samplers = 54 rows) and prints one JSON line per row (latent
FD) and one for the wall time. Rerunning reuses every finished row (the sweep's resume); pass a
fresh OUT for a clean figure.

    python tests/benchmarks/bench_sweep.py [--out /tmp/sweepbench] [--steps 200] [--num-samples 256]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEMO_MODEL = {  # cluster/demo_steps.py's train step, without evaluation while training
    "model.num_classes": 6,
    "model.depth": 4,
    "model.hidden_size": 128,
    "optim.lr": 1e-3,
    "optim.ema_decay": 0.995,
    "data.global_batch_size": 64,
    "log.every": 50,
    "log.tensorboard": "false",
    "log.progress": "false",
}


def prepare(out: Path) -> Path:
    """The demo's images, VAE and latents (full size), reused when present."""
    from cluster import demo_steps as steps
    from cluster.demo import SIZES, Log
    from latents.threads import set_torch_threads

    set_torch_threads()
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    log = Log(data)
    size = SIZES["full"]
    steps.make_images(data, size, log)
    vae = steps.make_vae(data, size, log)
    if not (data / "latents" / "card.json").exists():
        steps.encode(data, vae, None, log)
    return data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/sweepbench")
    p.add_argument("--steps", type=int, default=200, help="training steps per point")
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--sample-steps", type=int, default=25)
    args = p.parse_args()
    out = Path(args.out)
    data = prepare(out)
    command = [sys.executable, "-m", "cluster.cli", "sweep", "--paper", "--preset", "tiny-cpu"]
    command += ["--data", str(data / "latents"), "--vae", str(data / "vae"), "--out", str(out / "sweep")]
    command += ["--steps", str(args.steps), "--set", f"checkpoint.every={max(1, args.steps // 2)}"]
    command += [f"--set={k}={v}" for k, v in DEMO_MODEL.items()]
    command += ["--num-samples", str(args.num_samples), "--sample-steps", str(args.sample_steps)]
    print(" ".join(command), file=sys.stderr)
    load_before = os.getloadavg()
    start = time.perf_counter()
    code = subprocess.run(command, stdout=sys.stderr).returncode  # progress lines to stderr: stdout is JSON
    seconds = time.perf_counter() - start
    report = json.loads((out / "sweep" / "sweep.json").read_text())
    common = {"bench": "sweep", "date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()} CPUs"}
    for row in report["rows"]:
        print(
            json.dumps(
                common
                | {
                    "path": row["transport.path_type"],
                    "prediction": row["transport.prediction"],
                    "sampler": row["sampler"],
                    "latent_fd": row["latent_fd"],
                    "reused": row["reused"],
                }
            )
        )
    print(
        json.dumps(
            common
            | {
                "figure": "wall_seconds",
                "seconds": round(seconds, 1),
                "exit_code": code,
                "rows": len(report["rows"]),
                "train_steps": args.steps,
                "num_samples": args.num_samples,
                "sample_steps": args.sample_steps,
                "load_average_1m_before": round(load_before[0], 2),
                "load_average_1m_after": round(os.getloadavg()[0], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
