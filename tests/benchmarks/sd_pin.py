"""Pin the SD-VAE path's bytes: encode -> train -> sample through the `sit` CLI, then hash.

Run with one code tree on PYTHONPATH (e.g. main's, then this branch's) and compare the printed
sha256 lines: the shard bytes, the sampled images and the stored latents must be identical.

    PYTHONPATH=<tree> python tests/benchmarks/sd_pin.py WORKDIR
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np


def sh(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "cluster.cli", *args], check=True, stdout=subprocess.DEVNULL)


def main(work: str) -> None:
    import torch
    from diffusers import AutoencoderKL

    from pipeline.synthetic import synthetic_images, write_imagefolder

    w = Path(work)
    w.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    vae.save_pretrained(w / "vae")
    write_imagefolder(str(w / "src"), synthetic_images(num_classes=4, per_class=8, seed=0, broken=0))
    sh("encode", str(w / "src"), str(w / "data"), "--resolution", "64", "--vae", str(w / "vae"), "--quiet",
       "--shard-size", "16")  # fmt: skip
    sh("train", "--preset", "tiny-cpu", "--data", str(w / "data"), "--run-dir", str(w / "run"), "--steps", "3",
       "--set", "log.tensorboard=false", "--set", "log.progress=false", "--set", "model.num_classes=4",
       "--set", "data.global_batch_size=8")  # fmt: skip
    sh("sample", str(w / "run" / "ema.safetensors"), str(w / "out"), "--vae", str(w / "vae"), "--num-samples", "6",
       "--mode", "ODE", "--method", "euler", "--steps", "4", "--save-latents", "--quiet")  # fmt: skip
    for shard in sorted((w / "data" / "shards").glob("*.tar")):
        print("shard", shard.name, hashlib.sha256(shard.read_bytes()).hexdigest())
    npz = np.load(w / "out" / "samples.npz")
    print("images", hashlib.sha256(npz["arr_0"].tobytes()).hexdigest())
    for chunk in sorted((w / "out" / "chunks").glob("*.tar")):
        print("chunk", chunk.name, hashlib.sha256(chunk.read_bytes()).hexdigest())


if __name__ == "__main__":
    main(sys.argv[1])
