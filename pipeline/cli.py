"""`sit encode SRC DST`: encode an image dataset into a latent dataset, exactly once, on Ray.

SRC is any fsspec URL (path, file://, s3://, gs://) holding ImageNet as train class folders
(<wnid>/<image>), a validation folder with --labels, Hugging Face-style parquet shards or
webdataset tars; DST is the latent dataset root. Every image and its mirror go through the ADM
center crop and the Stable Diffusion VAE; shards are published atomically and a rerun skips the
ones already committed (kill it and run it again: the result is the same, byte for byte).
Unreadable, truncated, empty or non-image files and unknown labels are recorded in
DST/rejects.parquet; the job finishes the rest, then fails if rejects exceed --max-reject-fraction.

Examples:
  sit encode /data/imagenet/train s3://bucket/imagenet-256 --vae /models/sd-vae-ft-ema
  sit encode gs://bucket/imagenet-parquet gs://bucket/in512 --resolution 512 --address auto
  sit encode /data/imagenet/train /tmp/trial --classes 10 --limit 2000
"""

from __future__ import annotations

import argparse

from latents.argtypes import Lazy, fraction, nonnegative_float, positive_float, positive_int, resolution, show_progress
from latents.autoencoder import DEFAULT_VAE, VAE_CHOICES, VAE_DTYPES


def _stored_choices() -> list[str]:
    from latents.format import STORED_POSTERIOR, STORED_SAMPLE  # numpy and pyarrow: not for `sit --help`

    return [STORED_POSTERIOR, STORED_SAMPLE]


def encode_command(args: argparse.Namespace) -> int:
    from latents.artifacts import Kind, require_not_artifact
    from pipeline.job import EncodeConfig, run_encode
    from pipeline.sources import SourceFormat

    require_not_artifact(args.vae, "--vae", "a VAE folder", (Kind.MODEL,))
    cfg = EncodeConfig(
        source=args.src,
        dest=args.dst,
        resolution=args.resolution,
        vae=args.vae,
        dtype=args.dtype,
        stored=args.stored,  # None: the autoencoder decides (posterior for Gaussian ones)
        source_format=SourceFormat.parse(args.format),
        class_list=args.class_list,
        labels=args.labels,
        num_classes=args.num_classes,
        classes=args.classes,
        limit=args.limit,
        shard_size=args.shard_size,
        micro_batch=args.micro_batch,
        draft=args.draft,
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        readers=args.readers,
        max_reject_fraction=args.max_reject_fraction,
        seed=args.seed,
        address=args.address,
        progress=show_progress(args.quiet),
    )
    print(run_encode(cfg).format())  # errors: one line from `sit` (cluster.cli.USER_ERRORS)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "encode",
        help="encode images (folders, parquet, webdataset tars) into a latent dataset with an autoencoder on Ray",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="image source URL (path, file://, s3://, gs://)")
    p.add_argument("dst", help="latent dataset root URL (path, file://, s3://, gs://)")
    g = p.add_argument_group("what to encode")
    g.add_argument(
        "--resolution",
        type=resolution,
        default=256,
        help="image side: 256 or 512 (any multiple of 8 for trials; default: %(default)s)",
    )
    g.add_argument(
        "--vae",
        default=DEFAULT_VAE,
        help=f"autoencoder directory (save_pretrained) or locally cached hub id: AutoencoderKL (SD, SDXL, SD3, "
        f"FLUX.1), AutoencoderKLFlux2, AutoencoderDC or AutoencoderRAE, by its config; {' or '.join(VAE_CHOICES)} "
        "(default: %(default)s). Nothing is downloaded.",
    )
    g.add_argument(
        "--dtype", choices=list(VAE_DTYPES), default="fp32", help="VAE compute dtype, never fp16 (default: %(default)s)"
    )
    g.add_argument(
        "--stored",
        choices=Lazy(_stored_choices),
        default=None,
        help="Gaussian posteriors (AutoencoderKL, FLUX.2): store the mean+std (default) or one sampled latent; "
        "deterministic autoencoders (DC-AE, RAE) always store their latent",
    )
    g.add_argument("--seed", type=int, default=0, help="noise seed for --stored sample (default: %(default)s)")
    g.add_argument(
        "--draft",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="JPEG reduced-size decoding in place of the crop's BOX halvings (faster on large images; "
        "not bit-identical to the released preprocessing, see BENCHMARKS.md; default: off)",
    )
    g = p.add_argument_group("source")
    g.add_argument(
        "--format",
        default="auto",
        choices=["auto", "imagefolder", "valfolder", "parquet", "wds"],
        help="source layout (default: detected: *.parquet, *.tar, --labels given, else class folders)",
    )
    g.add_argument("--class-list", help="file of class names (wnids) in label order, one per line")
    g.add_argument("--labels", help="labels file of a validation folder: '<file> <wnid or label>' lines")
    g.add_argument("--num-classes", type=positive_int, help="number of classes (default: from the source, else 1000)")
    g.add_argument("--classes", help="subset for trials: N (labels 0..N-1) or a comma list of wnids / labels")
    g.add_argument("--limit", type=positive_int, help="encode only the first N images (in key order)")
    g.add_argument(
        "--max-reject-fraction",
        type=fraction,
        default=0.001,
        help="fail (after finishing) if more than this fraction of inputs is rejected (default: %(default)s)",
    )
    g = p.add_argument_group("sharding and Ray")
    g.add_argument("--shard-size", type=positive_int, help="samples per shard (default: 256 MiB of latents)")
    g.add_argument(
        "--micro-batch",
        type=positive_int,
        default=32,
        help="images per VAE forward (plus their mirrors); part of the shard plan (default: %(default)s)",
    )
    g.add_argument("--address", help="Ray cluster to join (e.g. auto, or host:6379); default: start a local Ray")
    g.add_argument("--workers", type=positive_int, help="encode actors (default: one per GPU, or 1 without GPUs)")
    g.add_argument(
        "--cpus-per-worker",
        type=positive_float,
        default=1.0,
        help="CPUs per encode actor, also its torch threads (default: %(default)s)",
    )
    g.add_argument(
        "--gpus-per-worker", type=nonnegative_float, help="GPUs per encode actor (default: 1 if the cluster has GPUs)"
    )
    g.add_argument(
        "--readers",
        type=positive_int,
        help="read/decode threads in all, shared out over the encode actors (default: the CPUs the encoders leave)",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar (none either when stderr is not a terminal); Ray's log lines go to a log file",
    )
    p.set_defaults(func=encode_command)
