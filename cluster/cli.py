"""The `sit` command: one entry point with a subcommand per job.

Each package registers its own subcommands (a `register(subparsers)` function); the handlers
are thin wrappers over library functions that the tests call directly.
"""

from __future__ import annotations

import argparse
import sys

from latents import cli as latents_cli
from pipeline import cli as pipeline_cli
from sampling import cli as sampling_cli
from trainer import cli as trainer_cli

REGISTRARS = (pipeline_cli.register, trainer_cli.register, sampling_cli.register, latents_cli.register)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sit",
        description="SiT at ImageNet scale: encode once, train anywhere, sample in bulk. "
        "Run `sit <command> --help` for a command's options.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for register in REGISTRARS:
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
