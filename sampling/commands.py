"""`sit sample` and `sit eval`: thin wrappers over `sampling.job`, `sampling.generate` and
`sampling.evaluate`."""

from __future__ import annotations

import argparse
import json

from latents.argtypes import fraction, nonnegative_float, positive_float, positive_int, show_progress
from latents.threads import set_torch_threads
from latents.words import plural

SAMPLE_DOC = """\
Generate images from a SiT checkpoint in bulk on Ray workers, FID-ready.

CKPT is our EMA export (.safetensors, from `sit train`) or a released SiT/DiT .pt (plain state
dict or training checkpoint; pass --model, e.g. SiT-XL/2, for its head count), any fsspec URL.
OUT is the output root (path, s3://, gs://):

  OUT/run.json                 what the run is (a rerun must match it, or is refused)
  OUT/chunks/chunk-NNNNNN.tar  PNG + .cls label (+ .latent.npy with --save-latents) per sample
  OUT/samples.npz              arr_0 uint8 (N, H, W, 3) in sample order + arr_1 labels: the ADM
                               evaluator's input, written once every chunk exists
  OUT/labels.npy               the label of every sample

Sample i is a function of (--seed, i) alone: the same image whatever the number of workers,
the batch size or restarts. Interrupted? Run the same command again: committed chunks are kept.

With --grid, OUT is a PNG file: a labelled grid of --per-class samples for each of --classes,
made locally in this process (no Ray).

Time runs from t = 0 (noise) to t = 1 (data), as in the released code.

Examples:
  sit sample SiT-XL-2-256x256.pt out/ --model SiT-XL/2 --vae sd-vae-ft-ema --cfg-scale 1.5 \\
      --guided-channels 3 --num-samples 50000          # the paper's FID-50K setting
  sit sample ema.safetensors grid.png --vae sd-vae-ft-ema --grid --classes 207,360,387 --cfg-scale 4
"""

EVAL_DOC = """\
FID and Inception Score of generated images against a reference, with the standard Inception.

SAMPLES: an .npz with arr_0 uint8 (N, H, W, 3) (e.g. OUT/samples.npz of `sit sample`), a
`sit sample` output directory, or a directory of image files.
--ref: the ADM reference batch (.npz with mu/sigma, e.g. VIRTUAL_imagenet256_labeled.npz), or
real images in any SAMPLES form (statistics are computed; --save-ref-stats keeps them).
--inception: the TorchScript file inception-2015-12-05.pt (StyleGAN3/EDM/clean-fid's), local;
it is never downloaded.
"""


def sample_command(args: argparse.Namespace) -> int:
    from latents.artifacts import Kind, require_file, require_not_artifact, require_output_file
    from sampling.generate import ModelSource
    from sampling.options import SamplingUsageError, sampler_options
    from sampling.plan import parse_classes, parse_policy

    set_torch_threads()  # latents.threads: the driver (and --grid) computes here
    require_file(args.checkpoint, "CKPT", "a checkpoint file (.safetensors export or .pt)")
    require_not_artifact(args.vae, "--vae", "a VAE folder", (Kind.MODEL,))
    if args.grid:
        require_output_file(args.out, "OUT (--grid)")
    options = sampler_options(args)
    source = ModelSource(
        checkpoint=args.checkpoint,
        vae=args.vae,
        vae_dtype=args.vae_dtype,
        allow_vae_mismatch=args.allow_vae_mismatch,
        model_name=args.model,
        num_heads=args.num_heads,
        image_size=args.image_size,
    )
    if args.grid:
        return _grid(args, source, options)
    from sampling.job import SampleJob, run_sample_job

    if args.num_samples is None:
        raise SamplingUsageError("--num-samples is required (50000 for the standard FID-50K)")
    classes = parse_classes(args.classes)
    job = SampleJob(
        source=source,
        out=args.out,
        options=options,
        num_samples=args.num_samples,
        seed=args.seed,
        class_policy=parse_policy(args.class_policy, classes),
        classes=classes,
        chunk_size=args.chunk_size,
        batch_size=args.batch_size,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        save_latents=args.save_latents,
        address=args.address,
        progress=show_progress(args.quiet),
    )
    s = run_sample_job(job)
    print(
        f"{plural(s.num_samples, 'sample')} in {s.out}: {plural(s.chunks, 'chunk')} ({s.skipped} already there), "
        f"{s.sampled:,} generated in {s.seconds:.1f}s ({s.images_per_s:.2f} images/s); npz: {s.npz}"
    )
    return 0


def _grid(args: argparse.Namespace, source, options) -> int:
    import fsspec
    import torch

    from sampling.generate import sample_grid
    from sampling.plan import parse_classes

    classes = parse_classes(args.classes) or (0, 1, 2, 3)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    image = sample_grid(source, options, classes, args.per_class, args.seed, args.batch_size, device)
    with fsspec.open(args.out, "wb") as f:
        image.save(f, format="PNG")
    shape = f"{plural(len(classes), 'class', 'classes')} x {plural(args.per_class, 'sample')}"
    print(f"grid of {shape} ({image.width}x{image.height}) -> {args.out}")
    return 0


def eval_command(args: argparse.Namespace) -> int:
    from latents.artifacts import Kind, require_not_artifact, require_output_file
    from sampling.evaluate import evaluate

    set_torch_threads()
    require_not_artifact(args.samples, "SAMPLES", "samples (.npz, `sit sample` output or images)", (Kind.SAMPLES,))
    require_not_artifact(args.ref, "--ref", "a reference (.npz or images)", (Kind.SAMPLES,))
    require_not_artifact(
        args.inception, "--inception", "the Inception TorchScript file"
    )  # missing: evaluate says where to get it
    if args.save_ref_stats:
        require_output_file(args.save_ref_stats, "--save-ref-stats")
    r = evaluate(
        args.samples,
        args.ref,
        args.inception,
        batch_size=args.batch_size,
        device=args.device,
        limit=args.num_samples,
        with_precision_recall=args.precision_recall,
        save_reference_stats=args.save_ref_stats,
        progress=show_progress(args.quiet),
    )
    if args.json:
        print(json.dumps(r.to_dict()))
        return 0
    print(f"samples:   {r.samples} ({r.num_samples:,} images, {r.feature_dim} features)")
    ref_count = f"{r.num_reference:,} images" if r.reference_from == "images" else "its mu/sigma"
    print(f"reference: {r.reference} ({ref_count})")
    print(f"FID:             {r.fid:.4f}")
    print(f"Inception Score: {r.inception_score:.3f} +- {r.inception_score_std:.3f}")
    if r.precision is not None:
        print(f"precision:       {r.precision:.4f}\nrecall:          {r.recall:.4f}")
    return 0


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    """The sampler flags of `sit sample` (parsed back with `sampler_options`)."""
    g = parser.add_argument_group("sampler (released defaults: SDE, Euler-Maruyama, 250 steps, sigma, Mean 0.04)")
    g.add_argument("--mode", default="SDE", help="SDE or ODE (default: %(default)s)")
    g.add_argument(
        "--method",
        default=None,
        help="SDE: euler (Euler-Maruyama) | heun. ODE: euler, heun, midpoint, rk4 (fixed steps) or "
        "dopri5, dopri8, bosh3, fehlberg2, adaptive_heun (adaptive). Default: euler for SDE, dopri5 for ODE",
    )
    g.add_argument(
        "--steps", type=positive_int, default=None, help="steps (SDE: 250 incl. the last step; fixed-step ODE: 50)"
    )
    g.add_argument(
        "--diffusion-form",
        default="sigma",
        help="SDE w_t: constant, SBDM, sigma, linear, decreasing, increasing-decreasing (default: %(default)s)",
    )
    g.add_argument(
        "--diffusion-norm", type=nonnegative_float, default=1.0, help="SDE diffusion norm (default: %(default)s)"
    )
    g.add_argument("--last-step", default="Mean", help="SDE last step: none, Mean, Tweedie, Euler (default: Mean)")
    g.add_argument(
        "--last-step-size", type=positive_float, default=0.04, help="SDE last step size (default: %(default)s)"
    )
    g.add_argument("--atol", type=positive_float, default=1e-6, help="adaptive ODE atol (default: %(default)s)")
    g.add_argument("--rtol", type=positive_float, default=1e-3, help="adaptive ODE rtol (default: %(default)s)")
    g.add_argument(
        "--cfg-scale", type=nonnegative_float, default=1.0, help="guidance scale; 1 = none (default: %(default)s)"
    )
    g.add_argument(
        "--guided-channels",
        default="all",
        help="latent channels guided: all, or 3 to reproduce the released DiT/SiT numbers (default: %(default)s)",
    )
    g.add_argument(
        "--guidance-interval",
        type=fraction,
        nargs=2,
        default=(0.0, 1.0),
        metavar=("LO", "HI"),
        help="guide only for t in [LO, HI] (t = 0 noise, t = 1 data; default: 0 1)",
    )
    g.add_argument(
        "--path-type", default=None, help="transport path: Linear, GVP, VP (default: the export's, else Linear)"
    )
    g.add_argument(
        "--prediction",
        default=None,
        help="model prediction: velocity, score, noise (default: the export's, else velocity)",
    )
    g.add_argument(
        "--sample-eps", type=float, default=None, help="sampling eps (default: the export's, else the path's own)"
    )
    g.add_argument("--precision", default="fp32", help="model forward: fp32 or bf16 autocast (default: %(default)s)")
    g.add_argument(
        "--time-shift",
        type=positive_float,
        default=None,
        help="SD3 time shift of the step grid, > 1 puts more steps near noise (fixed-step methods; "
        "default: the export's transport.sample_time_shift, else 1)",
    )


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("checkpoint")
    g.add_argument(
        "--model",
        default=None,
        help="preset of a released .pt (e.g. SiT-XL/2): gives its head count and is checked against the weights",
    )
    g.add_argument(
        "--num-heads", type=positive_int, default=None, help="attention heads of a released .pt without a preset"
    )
    g.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        help="image side in pixels; checked against the model (default: the model's latent side x the VAE's factor)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sample",
        help="generate images in bulk on Ray workers (PNG tars + ADM npz), or a quick grid",
        description=SAMPLE_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", metavar="CKPT", help="EMA export (.safetensors) or released SiT/DiT .pt (any URL)")
    p.add_argument("out", metavar="OUT", help="output root (path, s3://, gs://); with --grid, a PNG file")
    p.add_argument(
        "--vae",
        required=True,
        help="autoencoder directory (save_pretrained) or a locally cached hub id: the one the export records "
        "(class and config are checked; released .pt files assume the SD VAE)",
    )
    p.add_argument(
        "--allow-vae-mismatch",
        action="store_true",
        help="decode with a --vae other than the export records (its transform is still the export's)",
    )
    p.add_argument("--vae-dtype", default="fp32", help="VAE decoding precision: fp32 or bf16 (default: %(default)s)")
    add_checkpoint_arguments(p)
    g = p.add_argument_group("samples")
    g.add_argument("--num-samples", type=positive_int, default=None, help="number of images (required without --grid)")
    g.add_argument("--seed", type=int, default=0, help="run seed; sample i depends on (seed, i) only (default: 0)")
    g.add_argument(
        "--class-policy",
        default=None,
        help="uniform (random labels, as the ADM evaluation), balanced (i mod classes) or list "
        "(--classes cycled) (default: list if --classes is given, else uniform)",
    )
    g.add_argument("--classes", default=None, help="comma-separated labels, e.g. 207,360,387")
    g.add_argument("--save-latents", action="store_true", help="also store each sample's latents in its chunk")
    add_sampler_arguments(p)
    g = p.add_argument_group("job")
    g.add_argument(
        "--chunk-size", type=positive_int, default=1000, help="samples per published tar (default: %(default)s)"
    )
    g.add_argument(
        "--batch-size",
        type=positive_int,
        default=32,
        help="samples per sampler batch; CFG doubles it (default: %(default)s)",
    )
    g.add_argument("--workers", type=positive_int, default=None, help="Ray actors (default: one per GPU, else 1)")
    g.add_argument(
        "--gpus-per-worker", type=nonnegative_float, default=None, help="default: 1 on a GPU cluster, else 0"
    )
    g.add_argument(
        "--cpus-per-worker", type=positive_float, default=1.0, help="also torch threads (default: %(default)s)"
    )
    g.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    g.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars (none either when stderr is not a terminal); Ray's log lines go to a log file",
    )
    g = p.add_argument_group("grid (--grid: local, no Ray)")
    g.add_argument("--grid", action="store_true", help="write a labelled PNG grid to OUT instead of a bulk run")
    g.add_argument(
        "--per-class", type=positive_int, default=4, help="samples per class in the grid (default: %(default)s)"
    )
    p.set_defaults(func=sample_command)

    p = subparsers.add_parser(
        "eval",
        help="FID and Inception Score of samples against a reference (standard TorchScript Inception)",
        description=EVAL_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("samples", metavar="SAMPLES", help="samples .npz, `sit sample` output, or an image folder")
    p.add_argument("--ref", required=True, help="reference .npz (mu/sigma or arr_0 images) or image folder")
    p.add_argument("--inception", required=True, help="path of inception-2015-12-05.pt (TorchScript)")
    p.add_argument(
        "--batch-size", type=positive_int, default=100, help="images per Inception batch (default: %(default)s)"
    )
    p.add_argument(
        "--num-samples", type=positive_int, default=None, help="evaluate only the first N samples (default: all)"
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--precision-recall",
        action="store_true",
        help="also improved precision/recall (k=3); needs reference images, O(N^2) distances",
    )
    p.add_argument("--save-ref-stats", default=None, help="write the reference's mu/sigma to this .npz")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--quiet", action="store_true", help="no progress bars (none either when stderr is not a terminal)")
    p.set_defaults(func=eval_command)
