"""Autoencoder families: the FLOP model (GMAC per image of the real architectures), encode images/s of
each tiny test config, and the SD-VAE encode path side by side with another code tree (e.g. main's).

1. GMAC per 256 px image of encode and decode for the real configurations written out below,
   counted by `torch.utils.flop_counter.FlopCounterMode` on meta tensors (nothing allocated or
   downloaded): convolutions, matrix products and attention, as 2 FLOPs per multiply-add; elementwise
   ops (norms, activations) are not counted, as in DESIGN.md §5. An encoded image costs twice the
   encode figure in `sit encode` (the image and its mirror).
2. Images/s of `pipeline.encode.VaeEncoder` (image + mirror, float32, CPU, this process's threads)
   with each tiny config of tests/conftest.py at 64 px.
3. ``--interleaved N``: this tree's `VaeEncoder` and main's call body (copied here) on one module,
   in ABBA order, N calls each: the overhead of the new layer with the machine's noise cancelled.
4. ``--baseline-tree DIR``: the SD-VAE encode path (`VaeEncoder` with the real SD-VAE architecture,
   random weights) of this tree and of DIR (e.g. ``git archive main | tar -x -C /tmp/main``), each in
   its own subprocess, alternating rounds, so that both see the same machine state.

    python tests/benchmarks/bench_autoencoders.py [--baseline-tree /tmp/main] [--rounds 3]

Prints one JSON line per figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

# The real architectures (diffusers 0.42 class names and configs)
REAL_CONFIGS = {
    "SD-VAE (sd-vae-ft-ema)": ("AutoencoderKL", {
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
        "norm_num_groups": 32, "scaling_factor": 0.18215,
    }),
    "FLUX.1 VAE": ("AutoencoderKL", {
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 16,
        "norm_num_groups": 32, "use_quant_conv": False, "use_post_quant_conv": False,
        "scaling_factor": 0.3611, "shift_factor": 0.1159,
    }),
    "FLUX.2 VAE": ("AutoencoderKLFlux2", {  # diffusers' defaults are FLUX.2's: 32 ch, 2x2 patch, batch norm
        "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 32,
        "patch_size": [2, 2],
    }),
    "DC-AE f32c32 (SANA 1.0)": ("AutoencoderDC", {
        "latent_channels": 32, "attention_head_dim": 32,
        "encoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock",
                                "EfficientViTBlock"],
        "decoder_block_types": ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock",
                                "EfficientViTBlock"],
        "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
        "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
        "encoder_layers_per_block": [2, 2, 2, 3, 3, 3], "decoder_layers_per_block": [3, 3, 3, 3, 3, 3],
        "encoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
        "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]], "scaling_factor": 0.41407,
    }),
    "RAE DINOv2-B (ViT-XL decoder)": ("AutoencoderRAE", {
        "encoder_type": "dinov2", "encoder_hidden_size": 768, "encoder_patch_size": 14,
        "encoder_num_hidden_layers": 12, "encoder_input_size": 224, "decoder_hidden_size": 1152,
        "decoder_num_hidden_layers": 28, "decoder_num_attention_heads": 16, "decoder_intermediate_size": 4096,
        "patch_size": 16,
    }),
}  # fmt: skip


def gmac_per_image(cls_name: str, config: dict, resolution: int = 256) -> dict:
    """Encode and decode GMAC of one image, counted on meta tensors."""
    import diffusers
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"), torch.no_grad():
        model = getattr(diffusers, cls_name)(**config).eval()
        x = torch.empty(1, 3, resolution, resolution)
        with FlopCounterMode(display=False) as counter:
            out = model.encode(x)
        encode = counter.get_total_flops() / 2e9
        z = out.latent_dist.mean if hasattr(out, "latent_dist") else out.latent
        with FlopCounterMode(display=False) as counter:
            model.decode(z)
        decode = counter.get_total_flops() / 2e9
    return {"encode_gmac": round(encode, 1), "decode_gmac": round(decode, 1), "stored_latent": list(z.shape[1:])}


def tiny_rates(seconds: float = 3.0) -> list[dict]:
    """Images/s of VaeEncoder with each tiny test config at 64 px (batches of 8 images + mirrors)."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from latents.autoencoder import load_autoencoder
    from pipeline.encode import VaeEncoder, latent_spec
    from tests.conftest import FAMILY_SHAPES, save_tiny_autoencoder

    out = []
    images = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    keys = [f"k{i}" for i in range(8)]
    with tempfile.TemporaryDirectory() as tmp:
        for family in FAMILY_SHAPES:
            path = str(save_tiny_autoencoder(family, Path(tmp) / family))
            spec = latent_spec(load_autoencoder(path), 64)
            encoder = VaeEncoder(path, torch.float32, "cpu", spec)
            encoder(images, keys)  # warm-up
            start, n = time.perf_counter(), 0
            while time.perf_counter() - start < seconds:
                encoder(images, keys)
                n += 1
            rate = n * len(keys) / (time.perf_counter() - start)
            out.append({"family": family, "class": encoder.ae.family.value, "images_per_s": round(rate, 1)})
    return out


# Runs in a subprocess with one tree on sys.path: the SD-VAE encode path of that tree, images/s.
_SIDE = r"""
import json, sys, time
import numpy as np, torch
torch.set_num_threads(int(sys.argv[3]))
from pipeline.encode import VaeEncoder, latent_spec
try:  # main before issue 19 (an editable install may map missing modules to this tree: try main's first)
    from pipeline.vae import load_vae as load
except ImportError:
    from latents.autoencoder import load_autoencoder as load
vae_dir, res, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[4])
spec = latent_spec(load(vae_dir), res)
encoder = VaeEncoder(vae_dir, torch.float32, "cpu", spec)
images = np.random.default_rng(0).integers(0, 256, (2, res, res, 3), dtype=np.uint8)
keys = ["a", "b"]
out = encoder(images, keys)
start = time.perf_counter()
for _ in range(calls):
    encoder(images, keys)
print(json.dumps({"images_per_s": calls * len(keys) / (time.perf_counter() - start), "sum": float(out.sum())}))
"""


def side_by_side(baseline: str, rounds: int, resolution: int, threads: int, calls: int) -> dict:
    from diffusers import AutoencoderKL

    config = REAL_CONFIGS["SD-VAE (sd-vae-ft-ema)"][1]
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        AutoencoderKL(**config).save_pretrained(Path(tmp) / "sd-vae")
        rates: dict[str, list[float]] = {"this": [], "baseline": []}
        sums = {}
        order = (("baseline", baseline), ("this", str(ROOT)))
        for r in range(rounds):
            for label, tree in order if r % 2 == 0 else order[::-1]:  # ABBA: drift within a round cancels
                env = {**os.environ, "PYTHONPATH": tree}
                args = [
                    sys.executable,
                    "-c",
                    _SIDE,
                    str(Path(tmp) / "sd-vae"),
                    str(resolution),
                    str(threads),
                    str(calls),
                ]
                run = subprocess.run(args, env=env, cwd=tree, capture_output=True, text=True, check=True)
                result = json.loads(run.stdout.strip().splitlines()[-1])
                rates[label].append(result["images_per_s"])
                sums[label] = result["sum"]
    best = {k: max(v) for k, v in rates.items()}
    median = {k: sorted(v)[len(v) // 2] for k, v in rates.items()}
    return {
        "benchmark": "sd_vae_encode_side_by_side",
        "resolution": resolution,
        "threads": threads,
        "rounds": rates,
        "best_images_per_s": best,
        "ratio_this_over_baseline": round(best["this"] / best["baseline"], 4),
        "median_ratio": round(median["this"] / median["baseline"], 4),
        "same_output": sums["this"] == sums["baseline"],
    }


def _main_encode(vae, spec, images):
    """main's `VaeEncoder.__call__` (before issue 19) for stored="posterior", verbatim but for the names."""
    from pipeline.preprocess import to_model_input

    b = images.shape[0]
    x = torch.from_numpy(to_model_input(images))
    x = torch.cat([x, x.flip(-1)]).to(torch.float32).contiguous(memory_format=torch.channels_last)
    posterior = vae.encode(x).latent_dist
    mean = posterior.mean.float().reshape(spec.num_flips, b, *spec.latent_shape)
    std = posterior.std.float().reshape(spec.num_flips, b, *spec.latent_shape)
    mean, std = mean.transpose(0, 1), std.transpose(0, 1)
    return torch.stack([mean, std], dim=2).cpu().numpy().astype(spec.storage_dtype)


def interleaved(resolution: int, pairs: int) -> dict:
    """This tree's VaeEncoder and main's call body on the same module, alternating call by call (noise-robust)."""
    import numpy as np
    from diffusers import AutoencoderKL

    from latents.autoencoder import load_autoencoder
    from pipeline.encode import VaeEncoder, latent_spec

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        AutoencoderKL(**REAL_CONFIGS["SD-VAE (sd-vae-ft-ema)"][1]).save_pretrained(Path(tmp) / "sd-vae")
        path = str(Path(tmp) / "sd-vae")
        spec = latent_spec(load_autoencoder(path), resolution)
        encoder = VaeEncoder(path, torch.float32, "cpu", spec)
    images = np.random.default_rng(0).integers(0, 256, (2, resolution, resolution, 3), dtype=np.uint8)
    keys = ["a", "b"]
    times = {"this": [], "main_body": []}
    with torch.inference_mode():
        same = np.array_equal(encoder(images, keys), _main_encode(encoder.vae, spec, images))
        for i in range(2 * pairs):
            label = ("this", "main_body")[(i + i // 2) % 2]  # ABBA order: drift cancels
            start = time.perf_counter()
            encoder(images, keys) if label == "this" else _main_encode(encoder.vae, spec, images)
            times[label].append(time.perf_counter() - start)
    total = {k: sum(v) for k, v in times.items()}
    return {
        "benchmark": "sd_vae_encode_interleaved",
        "resolution": resolution,
        "calls_each": pairs,
        "seconds": {k: round(v, 3) for k, v in total.items()},
        "ratio_this_over_main_rate": round(total["main_body"] / total["this"], 4),
        "same_output": bool(same),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-tree", help="another checkout (e.g. main's) to compare the SD encode path with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=128, help="side-by-side image side (default: 128)")
    parser.add_argument("--calls", type=int, default=3, help="timed encoder calls (2 images + mirrors) per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-tiny", action="store_true")
    parser.add_argument("--only-side-by-side", action="store_true")
    parser.add_argument("--interleaved", type=int, default=0, help="also N ABBA pairs in one process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name, (cls_name, config) in REAL_CONFIGS.items() if not args.only_side_by_side else ():
        print(json.dumps({"benchmark": "autoencoder_gmac_256", "autoencoder": name, "class": cls_name,
                          **gmac_per_image(cls_name, config)}))  # fmt: skip
    if not (args.skip_tiny or args.only_side_by_side):
        for row in tiny_rates():
            print(json.dumps({"benchmark": "tiny_encode_64px_cpu", "threads": args.threads, **row}))
    if args.interleaved:
        print(json.dumps(interleaved(args.resolution, args.interleaved)))
    if args.baseline_tree:
        print(json.dumps(side_by_side(args.baseline_tree, args.rounds, args.resolution, args.threads, args.calls)))


if __name__ == "__main__":
    main()
