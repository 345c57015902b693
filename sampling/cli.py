"""`sit demo`: what the installed system can run end to end on embedded defaults.

Today (foundation only) that is the sampler self-check on Gaussian data; the encode -> train
-> sample pipeline joins it as those jobs land.
"""

from __future__ import annotations

import argparse
import time


def demo(args: argparse.Namespace) -> int:
    from sampling.gaussian import gaussian_self_check

    start = time.perf_counter()
    print("Samplers on Gaussian data x1 ~ N(m, 0.25 I) with the closed-form velocity as the model:")
    rows = gaussian_self_check(n=args.samples, seed=args.seed)
    width = max(len(r["check"]) for r in rows)
    for r in rows:
        status = "ok  " if r["ok"] else "FAIL"
        print(f"  {status} {r['check']:<{width}}  nfe {r['nfe']:>4}  error {r['error']:.2e} (tol {r['tolerance']:.1e})")
    failed = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)}/{len(rows)} checks passed in {time.perf_counter() - start:.1f}s")
    return 1 if failed else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the end-to-end demo on embedded defaults (CPU, local files)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--samples", type=int, default=4096, help="SDE samples per path (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.set_defaults(func=demo)
