"""`sit inspect URL` and `sit verify URL`: look at and check a latent dataset."""

from __future__ import annotations

import argparse
import json
import sys

from latents.argtypes import nonnegative_int, positive_int, show_progress
from latents.words import plural

STORAGE = """\
URL is a local path or an fsspec URL (file://, s3://, gs://). For S3-compatible stores set
AWS_ENDPOINT_URL and the usual AWS_* credentials; for GCS, the usual Google credentials.
"""
INSPECT_DESCRIPTION = (
    "Show a latent dataset's card (resolution, VAE, latent shape, flips), its sample, shard and class "
    "counts, its size and the encoder's rejects, from the card and manifests alone (no shard is read).\n\n" + STORAGE
)
VERIFY_DESCRIPTION = (
    "Check a latent dataset end to end: every shard's checksum, and every sample's latents decoded "
    "and checked against the card (shape, dtype, finite values, positive stds), the manifests and "
    "the counts (source = encoded + rejected).\n\n"
    + STORAGE
    + "\nExits 0 if the dataset is intact, 1 listing every problem found. Leftover temporary files of a "
    "killed writer are warnings (they never carry a final name); --strict fails on them. Shards are checked by\n"
    "--workers processes, each holding one shard at a time; memory does not grow with the dataset. The\n"
    "last line says how many MB were checked, in what time.\n"
)


def inspect_command(args: argparse.Namespace) -> int:
    from latents.summary import format_summary, summarize

    summary = summarize(args.url)  # a DatasetError or StorageError becomes one line in `sit`'s main
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(format_summary(summary))
        if args.histogram:
            for label, count in enumerate(summary["class_histogram"]):
                print(f"  class {label:>5}: {count:,}")
    return 0


def verify_command(args: argparse.Namespace) -> int:
    from latents.verify import verify

    report = verify(args.url, workers=args.workers, progress=show_progress(args.quiet), strict=args.strict)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if report.ok:
        rejected = "" if report.rejected is None else f" ({plural(report.rejected, 'input')} rejected by the encoder)"
        warned = f", {plural(len(report.warnings), 'warning')}" if report.warnings else ""
        print(
            f"OK: {report.url}: {plural(report.shards_checked, 'shard')}, "
            f"{plural(report.samples_checked, 'sample')} verified"
            f"{rejected}{warned}; {_rate(report)}"
        )
        return 0
    print(f"FAILED: {report.url}: {plural(len(report.problems), 'problem')}; {_rate(report)}", file=sys.stderr)
    for problem in report.problems[: args.max_problems]:
        print(f"  - {problem}", file=sys.stderr)
    if len(report.problems) > args.max_problems:
        print(f"  ... and {len(report.problems) - args.max_problems} more", file=sys.stderr)
    return 1


def _rate(report) -> str:
    return f"{report.bytes_checked / 1e6:,.1f} MB in {report.seconds:,.1f} s ({report.mb_per_s:,.1f} MB/s)"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="show a latent dataset's card, counts, classes and size",
        description=INSPECT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("url", metavar="URL", help="dataset root (path, file://, s3://, gs://)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--histogram", action="store_true", help="also print the count of every class")
    p.set_defaults(func=inspect_command)

    p = subparsers.add_parser(
        "verify",
        help="check every shard checksum and every sample of a latent dataset",
        description=VERIFY_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("url", metavar="URL", help="dataset root (path, file://, s3://, gs://)")
    p.add_argument(
        "--workers", type=positive_int, default=4, help="processes checking shards in parallel (default: %(default)s)"
    )
    p.add_argument("--max-problems", type=nonnegative_int, default=50, help="problems to list (default: %(default)s)")
    p.add_argument(
        "--quiet", action="store_true", help="no progress output (none either when stderr is not a terminal)"
    )
    p.add_argument("--strict", action="store_true", help="fail on leftover temporary files too")
    p.set_defaults(func=verify_command)
