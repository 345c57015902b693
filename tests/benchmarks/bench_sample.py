"""Images/s of 250-step SDE + CFG through `sit sample`'s job against the released scheme (CPU).

Ours: `sampling.job.run_sample_job` on a local Ray cluster with one actor - one model call per
SDE step (velocity and score from one output), forwards padded to >= 16 rows, per-sample RNG,
per-sample VAE decode, PNG tar publication; at ``--batch`` samples per sampler batch.
Released scheme: the drift and the score from two model calls per step (`released_sde` of
bench_sde_nfe.py, reused, not copied), CFG batch of 4 (8 rows per forward), then the VAE decode
and one PNG per image, as sample_ddp.py does.

The model is a small SiT with random weights at 256 px (32x32 latents); the VAE is the tests'
tiny random AutoencoderKL (the real SD VAE is not available offline here), so decoding costs
far less than with the SD VAE. Both sides use 1 torch thread and run at niceness 15, as Ray runs
its workers (on a shared machine a nice'd actor would otherwise lose to a baseline at niceness 0).
Prints one JSON line per figure.

    PYTHONPATH=. python tests/benchmarks/bench_sample.py [--model SiT-S/8] [--num-images 8] [--batches 4,8]

``--sampler-only`` times the sampler alone (`sampling.options.run_sampler`: noise -> latents, no
decode, no Ray) on ``--device`` with ``--precision`` (bf16: autocast of the forward, as `sit
sample --precision bf16`) and ``--compile`` (torch.compile per block), after an untimed warm-up
batch: the GPU suite's sampling figure (tests/benchmarks/gpu_suite.sh).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from latents.autoencoder import load_autoencoder
from sampling.generate import ModelSource
from sampling.guidance import classifier_free_guidance
from sampling.job import SampleJob, run_sample_job
from sampling.options import Precision, SamplerOptions, run_sampler
from tests.benchmarks.bench_sde_nfe import released_sde
from tests.conftest import save_tiny_vae
from trainer.export import save_export
from trainer.model import build_model
from trainer.transport import Transport

NICENESS = 15  # Ray's worker processes run at this niceness
THREADS = 1  # on a shared 2-core machine, 2 threads thrash (OpenMP spin-waits under load)


def released_images_per_s(model, vae, args) -> tuple[float, float]:
    """(images/s, wall seconds) of the released scheme on ``args.num_images`` images, batches of 4."""
    torch.set_num_threads(THREADS)
    gen = torch.Generator().manual_seed(0)
    transport, transform, done = Transport(), vae.own_transform(), 0
    start = time.perf_counter()
    while done < args.num_images:
        y = torch.randint(0, 1000, (4,), generator=gen)
        z = torch.randn(4, 4, args.input_size, args.input_size, generator=gen)
        fn = classifier_free_guidance(model, y, args.cfg_scale, null_class=1000)
        x, _ = released_sde(fn, transport, z, num_steps=args.steps, generator=gen)
        for image in vae.decode_to_uint8(x, transform):
            Image.fromarray(image).save(io.BytesIO(), format="PNG")
        done += 4
    wall = time.perf_counter() - start
    return done / wall, wall


def sampler_only(args) -> None:
    """Images/s of run_sampler alone on args.device (see the module docstring)."""
    device = args.device
    torch.manual_seed(0)
    model = build_model(args.model, input_size=args.input_size).to(device).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    if args.compile:
        for block in model.blocks:
            block.compile()
    precision = Precision(args.precision)
    batch = args.num_images

    def run(steps: int) -> float:
        options = SamplerOptions(num_steps=steps, cfg_scale=args.cfg_scale, precision=precision)
        noise = torch.randn(batch, 4, args.input_size, args.input_size, device=device)
        labels = torch.randint(0, 1000, (batch,), device=device)
        gens = [torch.Generator(device).manual_seed(i) for i in range(batch)]
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run_sampler(model, options, noise, labels, gens)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run(3)  # warm-up (and compilation)
    seconds = run(args.steps)
    print(
        json.dumps(
            {
                "figure": "sde_cfg_sampling_images_per_s",
                "value": round(batch / seconds, 3),
                "model": args.model,
                "image_size": args.input_size * 8,
                "steps": args.steps,
                "cfg_scale": args.cfg_scale,
                "batch": batch,
                "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                "precision": args.precision,
                "compile": args.compile,
                "decode": "none (sampler only)",
                "torch": torch.__version__,
            }
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SiT-S/8", help="model preset (random weights)")
    parser.add_argument("--input-size", type=int, default=32, help="latent side (32 = 256 px images)")
    parser.add_argument("--num-images", type=int, default=8, help="images per measurement (a multiple of 4)")
    parser.add_argument("--batches", default="4,8", help="our sampler batch sizes to measure")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--sampler-only", action="store_true", help="time run_sampler alone (no Ray, no decode)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="with --sampler-only")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="with --sampler-only")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (with --sampler-only)")
    args = parser.parse_args()
    if args.sampler_only:
        sampler_only(args)
        return
    if (args.device, args.precision, args.compile) != ("cpu", "fp32", False):
        parser.error("--device, --precision and --compile apply to --sampler-only (the Ray job runs on CPU here)")

    import ray

    os.nice(NICENESS - os.nice(0))  # the baseline runs as the Ray workers do
    ray.init(num_cpus=THREADS, include_dashboard=False, log_to_driver=False, configure_logging=False)
    tmp = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    model = build_model(args.model, input_size=args.input_size).eval()
    with torch.no_grad():  # random non-zero weights everywhere (adaLN-Zero init outputs zeros)
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_export(str(tmp / "model.safetensors"), model.state_dict(), model.config)
    save_tiny_vae(tmp / "vae")
    vae = load_autoencoder(str(tmp / "vae"))
    common = {
        "benchmark": "sit_sample_sde250_cfg",
        "model": args.model,
        "image_size": args.input_size * 8,
        "steps": args.steps,
        "cfg_scale": args.cfg_scale,
        "num_images": args.num_images,
        "vae": "tiny random AutoencoderKL (x8)",
        "device": f"cpu ({platform.processor() or platform.machine()}, {THREADS} threads)",
        "torch": torch.__version__,
        "niceness": os.nice(0),
    }
    released, released_wall = released_images_per_s(model, vae, args)
    print(
        json.dumps(
            {
                **common,
                "impl": "released",
                "batch": 4,
                "images_per_s": round(released, 4),
                "wall_s": round(released_wall, 2),
            }
        )
    )
    options = SamplerOptions(num_steps=args.steps, cfg_scale=args.cfg_scale)
    for batch in (int(b) for b in args.batches.split(",")):
        job = SampleJob(
            source=ModelSource(str(tmp / "model.safetensors"), str(tmp / "vae")),
            out=str(tmp / f"out-{batch}"),
            options=options,
            num_samples=args.num_images,
            chunk_size=args.num_images,
            batch_size=batch,
            workers=1,
            cpus_per_worker=THREADS,
            progress=False,
        )
        s = run_sample_job(job)
        ours = s.sampled / s.worker_seconds  # in the actor: sampling, decoding, PNG tar publication
        row = {
            **common,
            "impl": "sit sample",
            "batch": batch,
            "images_per_s": round(ours, 4),
            "images_per_s_incl_startup": round(s.images_per_s, 4),
            "wall_s": round(s.seconds, 2),
            "ours_over_released": round(ours / released, 3),
        }
        print(json.dumps(row), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
