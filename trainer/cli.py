"""`sit models`: the model presets with their sizes and parameter counts."""

from __future__ import annotations

import argparse


def models(args: argparse.Namespace) -> int:
    from trainer.model import SIT_MODELS, build_model, count_parameters

    print(f"{'name':<10} {'depth':>5} {'hidden':>6} {'heads':>5} {'patch':>5} {'tokens':>6} {'params':>12}")
    for name in SIT_MODELS:
        model = build_model(name, device="meta", input_size=args.input_size)
        c = model.config
        tokens = (c.input_size // c.patch_size) ** 2
        print(
            f"{name:<10} {c.depth:>5} {c.hidden_size:>6} {c.num_heads:>5} {c.patch_size:>5} {tokens:>6} "
            f"{count_parameters(model):>12,}"
        )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", help="list the SiT model presets", description=__doc__)
    p.add_argument(
        "--input-size", type=int, default=32, help="latent side: 32 for 256 px, 64 for 512 px (default: %(default)s)"
    )
    p.set_defaults(func=models)
