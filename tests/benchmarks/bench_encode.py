"""End-to-end `sit encode` images/s on this machine with the real SD-VAE architecture (random weights),
where its time goes, and the bare VAE encoder's rate measured in the same run as the baseline.

The VAE is `AutoencoderKL` with the config of stabilityai/sd-vae-ft-ema (block_out_channels 128, 256,
512, 512; 2 layers per block; 4 latent channels; 32 norm groups), randomly initialised and saved
with save_pretrained: the same FLOPs as the real one, nothing downloaded. Sources are ImageNet-like
JPEGs (500x375, quality 90) in class folders made here. The job starts its own local Ray (as
`sit encode` does without --address): one encode actor with ``--cpus - 1`` torch threads (at least
1) and one reader. Wall time includes starting Ray and loading the VAE.

    python tests/benchmarks/bench_encode.py [--images 8] [--resolution 256] [--cpus 2]

Prints one JSON line per figure. On a GPU machine, add --device cuda to measure the bare VAE there.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

SD_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}
ENCODER_GMAC_256 = 136  # DESIGN.md §5: SD VAE encoder multiply-adds per 256x256 image


def save_sd_vae(path: Path) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(path)
    return path


def bare_vae_rate(vae_dir: Path, resolution: int, batch: int, dtype: str, device: str, threads: int) -> float:
    """Source images/s of vae.encode on (image, mirror) batches: the ceiling for the job."""
    from latents.autoencoder import load_autoencoder, vae_dtype

    torch.set_num_threads(threads)
    vae = load_autoencoder(str(vae_dir), vae_dtype(dtype), device).module.to(memory_format=torch.channels_last)
    x = torch.rand(2 * batch, 3, resolution, resolution, device=device).to(vae_dtype(dtype)) * 2 - 1
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        vae.encode(x)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < 10 or n < 2:
            vae.encode(x)
            n += 1
        if device == "cuda":
            torch.cuda.synchronize()
    return n * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import ray

    from pipeline.job import EncodeConfig, run_encode
    from pipeline.synthetic import SyntheticImage, encode_image, picture, write_imagefolder

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vae_dir = save_sd_vae(tmp / "sd-vae")
        import numpy as np

        rng = np.random.default_rng(0)
        images = []
        for i in range(args.images):
            wnid = f"n{i % 4:08d}"
            data = encode_image(picture(rng, 500, 375), "RGB", "JPEG", quality=90)
            images.append(SyntheticImage(wnid, i % 4, f"{wnid}_{i:04d}.JPEG", data))
        write_imagefolder(str(tmp / "train"), images)
        encoder_threads = max(1, args.cpus - 1)
        common = {"resolution": args.resolution, "dtype": args.dtype, "threads": encoder_threads}
        bare = [bare_vae_rate(vae_dir, args.resolution, args.micro_batch, args.dtype, args.device, encoder_threads)]
        cfg = EncodeConfig(
            str(tmp / "train"), str(tmp / "out"), resolution=args.resolution, vae=str(vae_dir), dtype=args.dtype,
            micro_batch=args.micro_batch, shard_size=args.micro_batch * 2, cpus_per_worker=float(encoder_threads),
            readers=1, progress=False,
        )  # fmt: skip
        summary = run_encode(cfg)  # no address: starts a local Ray, as `sit encode` does by default
        ray.shutdown()
        bare.append(bare_vae_rate(vae_dir, args.resolution, args.micro_batch, args.dtype, args.device, encoder_threads))
        base = sum(bare) / 2  # measured before and after the job: the machine's load drifts
        print(json.dumps({"figure": "bare_vae_encode_images_per_s", **common, "device": args.device,
                          "micro_batch": args.micro_batch, "value": round(base, 3),
                          "before_after": [round(b, 3) for b in bare]}))  # fmt: skip
        rate = summary.encoded / summary.seconds
        print(json.dumps({"figure": "sit_encode_images_per_s", **common, "images": summary.encoded,
                          "value": round(rate, 3), "vs_bare_vae": round(rate / base, 3),
                          "wall_s": round(summary.seconds, 1)}))  # fmt: skip
        stage = {k: round(v, 2) for k, v in summary.stage_seconds.items()}
        per_image = {k: round(v / summary.encoded, 4) for k, v in summary.stage_seconds.items()}
        print(json.dumps({"figure": "sit_encode_stage_seconds", **common, "total": stage, "per_image": per_image}))
        vae_rate = summary.encoded / summary.stage_seconds["vae"]
        print(json.dumps({"figure": "sit_encode_vae_stage_images_per_s", **common, "value": round(vae_rate, 3),
                          "vs_bare_vae": round(vae_rate / base, 3)}))  # fmt: skip
        gmac = ENCODER_GMAC_256 * (args.resolution / 256) ** 2 * 2  # image and mirror
        print(json.dumps({"figure": "bare_vae_gflops", **common, "device": args.device,
                          "value": round(base * gmac * 2, 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
