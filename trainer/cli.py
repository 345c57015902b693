"""`sit models` (the model presets) and `sit train` (the trainer; also `python -m trainer.train`)."""

from __future__ import annotations

import argparse
import json
import sys

from latents.argtypes import Lazy, Parser, positive_int

TRAIN_DESCRIPTION = """\
Train a SiT model on a latent dataset written by `sit encode`, with FSDP2 on any number of
processes (one here; `torchrun --nproc_per_node N -m trainer.train ...` for more, same flags).

The config is a preset (--preset), then a JSON file (--config), then KEY=VALUE overrides
(--set optim.lr=2e-4, repeatable); --dry-run prints the resolved config and every key.
Checkpoints go to checkpoint.url (default <run-dir>/checkpoints; any fsspec URL such as
s3://bucket/run) and a restart resumes from the newest complete one. SIGTERM or SIGUSR1 finish
the current step, write a checkpoint and exit with code 75: a launcher restarts on 75 and stops
on 0. Outputs in --run-dir: config.json, metrics.jsonl, tensorboard/, samples/*.png and, at the
end, ema.safetensors (the consolidated EMA, loadable by `sit sample`; export_url puts it on object storage).
"""


MODELS_DESCRIPTION = """\
List the SiT models (SiT-S/B/L/XL with patch 1, 2, 4 or 8): depth, width, heads, patch size,
tokens per image at --input-size, parameter count and GMAC (multiply-adds, the papers' "FLOPs")
of one forward pass, counted by torch's FlopCounterMode on meta tensors (nothing allocated).
Then the `sit train` presets with their block options (released: gelu MLP, LayerNorm; modern:
SwiGLU, RMSNorm, 2-D RoPE, qk-norm). A model name goes to `sit train --set model.name=NAME` or to
`sit sample --model NAME` for a released .pt checkpoint; a preset to `sit train --preset NAME`.
"""


def _presets() -> list[str]:
    from trainer.config import PRESETS  # imports torch: only when `sit train` parses or shows its help

    return list(PRESETS)


def models(args: argparse.Namespace) -> int:
    import torch

    from trainer.config import PRESETS
    from trainer.model import SIT_MODELS, SiT, build_model, count_parameters, forward_gmac

    print(f"{'name':<10} {'depth':>5} {'hidden':>6} {'heads':>5} {'patch':>5} {'tokens':>6} {'params':>12} {'GMAC':>8}")
    for name in SIT_MODELS:
        model = build_model(name, device="meta", input_size=args.input_size)
        c = model.config
        tokens = (c.input_size // c.patch_size) ** 2
        print(
            f"{name:<10} {c.depth:>5} {c.hidden_size:>6} {c.num_heads:>5} {c.patch_size:>5} {tokens:>6} "
            f"{count_parameters(model):>12,} {forward_gmac(c):>8.1f}"
        )
    print(f"\n{'preset':<20} {'model':<8} {'latent':>10} {'blocks':<30} {'params':>12} {'GMAC':>8}")
    for name, make in PRESETS.items():
        config = make().model.sit_config()
        with torch.device("meta"):
            model = SiT(config)
        c = config
        blocks = "/".join([c.mlp.value, c.norm.value] + ["rope"] * c.rope + ["qk-norm"] * c.qk_norm)
        size = make().model.name.removeprefix("SiT-")
        latent = f"{c.in_channels}x{c.input_size}x{c.input_size}"
        print(f"{name:<20} {size:<8} {latent:>10} {blocks:<30} {count_parameters(model):>12,} {forward_gmac(c):>8.1f}")
    return 0


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        default="sit-xl2-256",
        choices=Lazy(_presets),
        metavar="NAME",
        help="model and recipe preset: %(choices)s (default: %(default)s)",
    )
    p.add_argument("--config", metavar="FILE", help="a .json file of config sections applied on the preset")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key, e.g. --set optim.lr=2e-4 --set parallel.precision=fp32 (repeatable)",
    )
    p.add_argument("--data", metavar="URL", help="the latent dataset (same as --set data.url=URL)")
    p.add_argument(
        "--run-dir", metavar="DIR", help="local folder for logs, grids and the export (run_dir; default: the preset's)"
    )
    p.add_argument(
        "--steps", type=positive_int, metavar="N", help="optimizer steps in total (total_steps; default: the preset's)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the resolved config as JSON and exit")


def resolve_args(args: argparse.Namespace):
    from trainer.config import resolve

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.url={args.data}")
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    if args.steps is not None:
        overrides.append(f"total_steps={args.steps}")
    return resolve(args.preset, args.config, overrides)


def train(args: argparse.Namespace) -> int:
    from latents.artifacts import Kind, require_output
    from latents.threads import set_torch_threads

    config = resolve_args(args)
    require_output(config.run_dir, Kind.TRAIN_RUN, "--run-dir")  # before any process group or file
    if args.dry_run:
        print(json.dumps(config.to_dict(), indent=1))
        return 0
    set_torch_threads()  # latents.threads: explicit, so a loaded machine slows training by its load only
    from trainer.train import train as run

    result = run(config)
    if result.step and config.run_dir:
        state = "preempted, resume by starting again" if result.exit_code else "finished"
        print(
            f"{state}: step {result.step}/{config.total_steps}, {result.images_seen:,} images, "
            f"last loss {result.last_loss:.4f}, {result.nonfinite_steps} non-finite steps skipped"
            + (f", resumed from {result.resumed_from}" if result.resumed_from else "")
        )
        for r in result.rollbacks:
            print(
                f"rollback {r['rollbacks']}: {r['reason']} at step {r['spike_step']} (loss {r['spike_loss']:.6g}), "
                f"back to step {r['to_step']}, skipped batches {r['skipped_batches'][0]}-{r['skipped_batches'][1]}"
            )
        if result.checkpoint:
            print(f"checkpoint: {result.checkpoint}")
        if result.export:
            print(f"EMA export: {result.export}")
    return result.exit_code


def train_main(argv: list[str] | None = None) -> int:
    """`python -m trainer.train`: the same flags as `sit train` (for torchrun)."""
    parser = Parser(
        prog="python -m trainer.train",
        description=TRAIN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return train(args)
    except Exception as err:
        from cluster.cli import is_user_error  # the one list of user errors (`sit`'s)

        if not is_user_error(err):
            raise
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "models",
        help="list the SiT models and training presets (parameters, GMAC)",
        description=MODELS_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--input-size",
        type=positive_int,
        default=32,
        help="latent side: 32 for 256 px, 64 for 512 px (default: %(default)s)",
    )
    p.set_defaults(func=models)
    p = subparsers.add_parser(
        "train",
        help="train SiT on a latent dataset (FSDP2, exact resume)",
        description=TRAIN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(p)
    p.set_defaults(func=train)
