"""NFE and wall time of 250-step Euler-Maruyama SDE sampling with CFG on a small SiT (CPU).

Ours: one model call per step (velocity and score from the same output), Mean last step,
NFE = 250. Released scheme (re-implemented here): the drift v and the score are two separate
model calls per step, and the Mean last step calls both again: NFE = 2 * 249 + 2 = 500. Each
call is one guided forward over the doubled (cond + uncond) batch in both.

Both use the same grid and the same Brownian increments, so their samples must agree up to
float rounding; the script checks that. Prints one JSON line per figure.

    python tests/benchmarks/bench_sde_nfe.py [--model SiT-S/8] [--batch 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from sampling.guidance import classifier_free_guidance
from sampling.sde import diffusion_coefficient, sample_sde, sde_interval
from trainer.model import build_model
from trainer.transport import Transport


def released_sde(model_fn, transport: Transport, z, num_steps=250, form="sigma", h=0.04, generator=None):
    """The released Euler-Maruyama loop: drift and score from two model calls per step."""
    path = transport.path
    t0, t1 = sde_interval(transport, form, "Mean", h)
    grid = torch.linspace(t0, t1, num_steps, dtype=torch.float64)  # num_steps points: 249 steps
    dt = (t1 - t0) / (num_steps - 1)
    calls = 0

    def drift(x, t):
        nonlocal calls
        calls += 2
        v = model_fn(x, t)  # call 1: the velocity
        s = path.score_from_velocity(model_fn(x, t), x, t)  # call 2: the score, same model again
        w = diffusion_coefficient(path, t, form).reshape(-1, 1, 1, 1)
        return v + w * s, w

    x = z
    with torch.no_grad():
        for ti in grid[:-1]:
            t = torch.full((x.shape[0],), float(ti), dtype=x.dtype)
            d, w = drift(x, t)
            x = x + d * dt + torch.sqrt(2 * w * dt) * torch.randn(x.shape, generator=generator, dtype=x.dtype)
        t = torch.full((x.shape[0],), t1, dtype=x.dtype)
        x = x + drift(x, t)[0] * h
    return x, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SiT-S/8", help="model preset (random weights)")
    parser.add_argument("--input-size", type=int, default=32, help="latent side (32 = 256 px images)")
    parser.add_argument("--batch", type=int, default=4, help="samples per run (the guided forward runs 2x)")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each; medians are reported")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build_model(args.model, input_size=args.input_size).eval()
    with torch.no_grad():  # random non-zero weights everywhere (adaLN-Zero init outputs zeros)
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    y = torch.randint(0, 1000, (args.batch,))
    fn = classifier_free_guidance(model, y, args.cfg_scale, null_class=1000)
    transport = Transport()
    z = torch.randn(args.batch, 4, args.input_size, args.input_size)

    def ours():
        out = sample_sde(fn, transport, z, num_steps=args.steps, generator=torch.Generator().manual_seed(1))
        return out.x, out.nfe

    def released():
        return released_sde(fn, transport, z, num_steps=args.steps, generator=torch.Generator().manual_seed(1))

    times: dict[str, list[float]] = {"ours": [], "released": []}
    results = {}
    for _ in range(args.repeats):  # interleaved, so drift in machine speed hits both alike
        for name, run in (("ours", ours), ("released", released)):
            start = time.perf_counter()
            results[name] = run()
            times[name].append(time.perf_counter() - start)

    common = {
        "benchmark": "sde_euler_maruyama_cfg",
        "model": args.model,
        "input_size": args.input_size,
        "batch": args.batch,
        "steps": args.steps,
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
    }
    for name in ("ours", "released"):
        nfe = results[name][1]
        walls = [round(t, 3) for t in times[name]]
        print(json.dumps({**common, "impl": name, "nfe": nfe, "wall_s": statistics.median(walls), "wall_s_all": walls}))
    diff = (results["ours"][0] - results["released"][0]).abs().max().item()
    ratio = statistics.median(times["released"]) / statistics.median(times["ours"])
    nfe_ratio = results["released"][1] / results["ours"][1]
    figure = {"figure": "released_over_ours_wall_time", "ratio": round(ratio, 3), "nfe_ratio": nfe_ratio}
    print(json.dumps({**common, **figure, "max_abs_sample_diff": diff}))


if __name__ == "__main__":
    main()
