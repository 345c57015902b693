"""The `sit` command: one entry point with a subcommand per job.

Each package registers its own subcommands (a `register(subparsers)` function); the handlers
are thin wrappers over library functions that the tests call directly.

Errors a user can act on (a bad dataset, an unreachable store, a missing file or model, a
mismatched checkpoint) end the command with one line on stderr and exit status 1; ``--debug``
shows the traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

from cluster import demo, sweep
from latents import cli as latents_cli
from latents.argtypes import Parser
from pipeline import cli as pipeline_cli
from sampling import cli as sampling_cli
from trainer import cli as trainer_cli
from trainer import status as trainer_status

REGISTRARS = (
    demo.register,
    sweep.register,
    pipeline_cli.register,
    trainer_cli.register,
    trainer_status.register,
    sampling_cli.register,
    latents_cli.register,
)

# Exceptions that mean "the input is wrong", as (module, class): one line and exit 1, no traceback.
# Named, not imported, so that `sit inspect` does not pay for importing torch; an error can only
# be raised once its module is imported, so matching against sys.modules is exact.
USER_ERRORS = (
    ("builtins", "FileNotFoundError"),
    ("builtins", "PermissionError"),
    ("latents.format", "DatasetError"),
    ("latents.storage", "StorageError"),
    ("latents.autoencoder", "AutoencoderError"),
    ("trainer.export", "ExportError"),
    ("trainer.checkpoint_import", "CheckpointMismatchError"),
    ("pipeline.sources", "SourceError"),
    ("trainer.config", "ConfigError"),
    ("trainer.checkpoint", "CheckpointError"),
    ("trainer.train", "DatasetMismatchError"),
    ("trainer.train", "NonFiniteLossError"),
    ("trainer.rollback", "RollbackLimitError"),
    ("pipeline.job", "EncodeError"),
    ("sampling.checkpoint", "CheckpointError"),
    ("sampling.options", "SamplingUsageError"),
    ("sampling.output", "RunMismatchError"),
    ("sampling.output", "SampleFormatError"),
    ("sampling.job", "SampleJobError"),
    ("sampling.generate", "NonFiniteSamplesError"),
    ("sampling.fid", "StatisticsError"),
    ("sampling.image_sources", "ImageSourceError"),
    ("cluster.demo", "DemoError"),
    ("latents.artifacts", "ArtifactError"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="sit",
        description="SiT at ImageNet scale: encode once, train anywhere, sample in bulk. "
        "Run `sit <command> --help` for a command's options.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for register in REGISTRARS:
        register(subparsers)
    return parser


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is one of USER_ERRORS (see there)."""
    for module, name in USER_ERRORS:
        loaded = sys.modules.get(module)
        if loaded is None and module == "builtins":
            loaded = import_module(module)
        if loaded is not None and isinstance(err, getattr(loaded, name)):  # tests check every name exists
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as err:
        if args.debug or not is_user_error(err):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"sit {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
