"""The sampling package's subcommands: `sit selfcheck` here, `sit sample` and `sit eval` in
`sampling.commands`."""

from __future__ import annotations

import argparse
import time

from latents.argtypes import positive_int
from latents.threads import set_torch_threads
from sampling import commands

SELFCHECK_DESCRIPTION = """\
`sit selfcheck` runs every sampler family (adaptive and fixed-step ODE, Euler-Maruyama and Heun
SDE, likelihood) on every path against the closed-form answer for Gaussian data, where the exact
velocity is known: a check of the installed samplers that needs no trained model. Exits 0 when
every check passes, 1 when any fails.
"""


def selfcheck(args: argparse.Namespace) -> int:
    from sampling.gaussian import gaussian_self_check

    set_torch_threads()
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
    commands.register(subparsers)
    p = subparsers.add_parser(
        "selfcheck",
        help="check the samplers against closed-form answers on Gaussian data",
        description=SELFCHECK_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--samples", type=positive_int, default=4096, help="SDE samples per path (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.set_defaults(func=selfcheck)
