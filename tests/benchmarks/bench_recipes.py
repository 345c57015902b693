"""Released recipe vs the modern preset, side by side on the demo's data (issue 16, acceptance 4).

Builds the demo's data once with `sit demo`'s own steps (images, the fitted tiny VAE, the encoded
latents; ``--size full`` as `sit demo`), or takes them from a finished ``sit demo --out DIR``
(``--data-from DIR``), then trains the demo's model (tiny-cpu, depth 4, width 128, batch 64,
lr 1e-3, EMA 0.995) twice with the same steps, seed and data, both at once (one process each):

* released: uniform t, MSE, the DiT block;
* modern:   `trainer.config.modernize` - SwiGLU, RMSNorm, 2-D RoPE, qk-norm, logit-normal(0, 1)
            t and the direction loss with weight 1 (as `sit-b2-256-modern`).

Both evaluate the EMA's latent Fréchet distance at the same steps (the trainer's own evaluation:
the same samples, SDE 50 steps). They run side by side, so machine load hits both alike.

    python tests/benchmarks/bench_recipes.py --out /tmp/recipes [--size full|quick] [--data-from DIR]

Prints one JSON line per (recipe, evaluation step) and one summary line per recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

MODERN = {
    "model.mlp": "swiglu",
    "model.norm": "rmsnorm",
    "model.rope": "true",
    "model.qk_norm": "true",
    "transport.time_sampling": "logit_normal",
    "transport.direction_weight": "1.0",
}


def build_data(out: Path, size, data_from: str | None) -> str:
    from cluster.demo_steps import encode, make_images, make_vae

    if data_from:
        return str(Path(data_from) / "latents")
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    make_images(out, size, log)
    vae_dir = make_vae(out, size, log)
    done = out / "latents.done"
    if not done.exists():
        done.write_text(encode(out, vae_dir, None, log)["url"])
    return done.read_text()


def start(out: Path, name: str, data: str, size, extra: dict) -> subprocess.Popen | None:
    from cluster.demo_data import class_names

    run_dir = out / f"run-{name}"
    overrides = {
        "model.num_classes": len(class_names()),
        "model.depth": 4,
        "model.hidden_size": 128,
        "checkpoint.every": size.train_steps,
        "optim.lr": 1e-3,
        "optim.ema_decay": 0.995,
        "data.global_batch_size": 64,
        "log.every": 10,
        "log.eval_every": max(1, size.train_steps // 4),
        "log.eval_samples": size.samples_per_class * len(class_names()),
        "log.eval_steps": 50,
        "log.tensorboard": "false",
        "log.progress": "false",
        **extra,
    }
    args = ["--preset", "tiny-cpu", "--data", data, "--run-dir", str(run_dir), "--steps", str(size.train_steps)]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    if (run_dir / "ema.safetensors").exists():
        return None
    return subprocess.Popen([sys.executable, "-m", "trainer.train", *args], cwd=ROOT)


def report(out: Path, name: str, size, extra: dict, seconds: float, load_before: float) -> dict:
    run_dir = out / f"run-{name}"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r.get("event") == "eval"]
    losses = [r for r in records if "loss" in r and "event" not in r]
    for e in evals:
        print(json.dumps({"recipe": name, "step": e["step"], "latent_fd": round(e["eval_latent_fd"], 4)}), flush=True)
    summary = {
        "recipe": name,
        "steps": size.train_steps,
        "final_latent_fd": round(evals[-1]["eval_latent_fd"], 4) if evals else None,
        "last_loss": losses[-1]["loss"] if losses else None,  # modern: MSE + direction term
        "last_mse": losses[-1].get("mse", losses[-1]["loss"]) if losses else None,
        "train_seconds": round(seconds, 1),
        "load_avg_1min_before": round(load_before, 2),
        "load_avg_1min_after": round(os.getloadavg()[0], 2),
        "overrides": extra,
    }
    print(json.dumps(summary), flush=True)
    return summary


def main() -> None:
    from cluster.demo import SIZES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="work folder (data and both runs; reused when rerun)")
    parser.add_argument("--size", default="full", choices=sorted(SIZES))
    parser.add_argument("--data-from", metavar="DIR", help="a finished `sit demo --out DIR`: use its latents")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = SIZES[args.size]
    data = build_data(out, size, args.data_from)
    recipes = {"released": {}, "modern": MODERN}
    load_before, began = os.getloadavg()[0], time.perf_counter()
    procs = {name: start(out, name, data, size, extra) for name, extra in recipes.items()}
    seconds = {}
    for name, proc in procs.items():
        if proc is not None and proc.wait() != 0:
            raise SystemExit(f"the {name} run failed with exit code {proc.returncode}; see {out}/run-{name}")
        seconds[name] = time.perf_counter() - began
    for name, extra in recipes.items():
        report(out, name, size, extra, seconds[name], load_before)


if __name__ == "__main__":
    main()
