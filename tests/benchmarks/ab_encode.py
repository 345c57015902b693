"""`sit encode` throughput, two source trees side by side: A (e.g. main) and B (this tree), alternately.

Each run is a fresh ``python -m cluster.cli encode`` with the tree first on PYTHONPATH (its own
local Ray, as `sit encode` starts by default), on the same folder of ImageNet-like JPEGs (500x375,
quality 90) with the tiny test VAE at 64 px. The figure is the images/s the job prints (encoded
images over its whole wall time, Ray start and listing included), and the ratio B/A of the
medians. Alternating A, B, A, B, ... spreads the shared machine's load drift over both.

    python tests/benchmarks/ab_encode.py --a /work/main --b . [--images 768] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(tree: Path, src: Path, dst: Path, vae: Path, micro_batch: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    args = [sys.executable, "-m", "cluster.cli", "encode", str(src), str(dst), "--vae", str(vae)]
    args += ["--resolution", "64", "--micro-batch", str(micro_batch), "--shard-size", "256", "--quiet"]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tree)
    if proc.returncode != 0:
        raise RuntimeError(f"{tree}: {proc.stderr[-2000:]}")
    return float(re.search(r"\(([\d,.]+) images/s encoded", proc.stdout).group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", type=Path, default=Path("/work/main"))
    parser.add_argument("--b", type=Path, default=REPO)
    parser.add_argument("--images", type=int, default=768)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=32)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import numpy as np

    from pipeline.synthetic import SyntheticImage, encode_image, picture, write_imagefolder
    from tests.conftest import save_tiny_vae

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vae = save_tiny_vae(tmp / "tiny-vae")
        rng = np.random.default_rng(0)
        images = []
        for i in range(args.images):
            wnid = f"n{i % 8:08d}"
            data = encode_image(picture(rng, 500, 375), "RGB", "JPEG", quality=90)
            images.append(SyntheticImage(wnid, i % 8, f"{wnid}_{i:05d}.JPEG", data))
        write_imagefolder(str(tmp / "train"), images)
        rates: dict[str, list[float]] = {"a": [], "b": []}
        for r in range(args.rounds):
            for side in ("a", "b"):
                tree = getattr(args, side).resolve()
                rates[side].append(run(tree, tmp / "train", tmp / f"out-{side}-{r}", vae, args.micro_batch))
        load = os.getloadavg()[0]
        machine = f"{os.cpu_count()}-core CPU, load {load:.1f}"
        for side in ("a", "b"):
            print(json.dumps({"figure": "sit_encode_images_per_s", "tree": str(getattr(args, side)),
                              "images": args.images, "runs": rates[side], "value": statistics.median(rates[side]),
                              "machine": machine}))  # fmt: skip
        ratio = statistics.median(rates["b"]) / statistics.median(rates["a"])
        print(json.dumps({"figure": "sit_encode_b_over_a", "value": round(ratio, 3), "machine": machine}))


if __name__ == "__main__":
    main()
