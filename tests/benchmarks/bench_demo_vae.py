"""The demo's VAE fit alone and beside one busy process: explicit torch threads keep the slowdown
near the load factor (`latents.threads`).

Each figure fits the demo's small AutoencoderKL for --steps steps in a fresh process (as `sit demo`
does in its own process), idle and then with one competing process spinning on a core, back to
back, for two thread policies: ours (`latents.threads.set_torch_threads()`) and torch's default
(one thread per core). Prints one JSON line per figure, then one per policy with the loaded/idle
ratio. On a shared machine the "idle" runs share it too: compare the ratios of one run.

    python -m tests.benchmarks.bench_demo_vae [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

FIT = """
import sys, tempfile, time
if sys.argv[1] == "ours":
    from latents.threads import set_torch_threads
    set_torch_threads()
import torch
from cluster.demo import IMAGE_SIZE, RESOLUTION, SIZES
from cluster.demo_data import fit_vae, images_tensor, shape_images
images = images_tensor(shape_images(SIZES["quick"].per_class, IMAGE_SIZE), RESOLUTION)
start = time.perf_counter()
fit_vae(images, tempfile.mkdtemp(), steps=int(sys.argv[2]), log=lambda m: None)
print(time.perf_counter() - start, torch.get_num_threads())
"""


def fit_seconds(policy: str, steps: int) -> tuple[float, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SIT_TORCH_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-c", FIT, policy, str(steps)], capture_output=True, text=True, check=True, env=env
    )
    seconds, threads = out.stdout.split()
    return float(seconds), int(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="VAE fitting steps per figure (default: 20)")
    args = parser.parse_args()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    for policy in ("ours", "torch-default"):
        idle, threads = fit_seconds(policy, args.steps)
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.5)
            loaded, _ = fit_seconds(policy, args.steps)
        finally:
            busy.kill()
            busy.wait()
        for load, seconds in (("idle", idle), ("one busy process", loaded)):
            row = {"figure": f"demo VAE fit, {args.steps} steps", "threads": f"{policy} ({threads})", "load": load}
            print(json.dumps({**row, "seconds": round(seconds, 2), "machine": machine, "loadavg": os.getloadavg()[0]}))
        print(
            json.dumps(
                {"figure": "loaded / idle", "threads": f"{policy} ({threads})", "ratio": round(loaded / idle, 2)}
            )
        )


if __name__ == "__main__":
    main()
