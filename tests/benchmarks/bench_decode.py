"""Decode + ADM crop images/s per core at 256 and 512, with and without JPEG draft decoding, against a
plain PIL full decode measured in the same run; and the error draft decoding introduces.

The JPEGs are made here: ImageNet-like (500x375 and 375x500, quality 90) and large (1600x1200, like
the ImageNet images whose short side is at least 512). One process, one thread: figures are per core.

    python tests/benchmarks/bench_decode.py [--images 100] [--rounds 5]

Prints one JSON line per figure.
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
from PIL import Image

from pipeline.preprocess import preprocess
from pipeline.synthetic import encode_image, picture


def make_jpegs(n: int, sizes: list[tuple[int, int]], seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [encode_image(picture(rng, *sizes[i % len(sizes)]), "RGB", "JPEG", quality=90) for i in range(n)]


def rates(methods: dict, items: list[bytes], rounds: int) -> dict[str, float]:
    """Images/s of each method: the median over ``rounds`` passes, methods interleaved within each
    round so that load from other processes hits them alike."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            start = time.perf_counter()
            for data in items:
                fn(data)
            times[name].append(time.perf_counter() - start)
    return {name: len(items) / float(np.median(t)) for name, t in times.items()}


def pil_full_decode(data: bytes) -> None:
    Image.open(io.BytesIO(data)).convert("RGB").load()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved passes per method (median reported)")
    args = parser.parse_args()
    sets = {
        "imagenet-like 500x375 q90": make_jpegs(args.images, [(500, 375), (375, 500)]),
        "large 1600x1200 q90": make_jpegs(max(10, args.images // 4), [(1600, 1200)], seed=1),
    }
    for name, jpegs in sets.items():
        methods = {"pil": pil_full_decode}
        for target in (256, 512):
            for draft in (False, True):
                methods[f"{target}-{draft}"] = lambda d, t=target, dr=draft: preprocess(d, t, dr)
        measured = rates(methods, jpegs, args.rounds)
        base = measured["pil"]
        print(json.dumps({"figure": "pil_full_decode_images_per_s_per_core", "set": name, "value": round(base, 1)}))
        for target in (256, 512):
            for draft in (False, True):
                r = measured[f"{target}-{draft}"]
                print(
                    json.dumps(
                        {
                            "figure": "decode_crop_images_per_s_per_core",
                            "set": name,
                            "resolution": target,
                            "draft": draft,
                            "value": round(r, 1),
                            "vs_pil_full_decode": round(r / base, 3),
                        }
                    )
                )
        for target in (256, 512):
            full = np.stack([preprocess(d, target, False) for d in jpegs]).astype(np.float64)
            drafted = np.stack([preprocess(d, target, True) for d in jpegs]).astype(np.float64)
            err = np.abs(full - drafted)
            mse = float((err**2).mean())
            print(
                json.dumps(
                    {
                        "figure": "draft_error_vs_full_decode",
                        "set": name,
                        "resolution": target,
                        "changed_fraction": float((err.reshape(len(jpegs), -1).max(1) > 0).mean()),
                        "mean_abs_levels": round(float(err.mean()), 3),
                        "max_abs_levels": float(err.max()),
                        "psnr_db": round(10 * np.log10(255**2 / mse), 2) if mse else None,
                    }
                )
            )
    # what JPEG quality 90 itself costs, for scale: full-decode crop of the JPEG vs of the lossless picture
    rng = np.random.default_rng(2)
    pics = [picture(rng, 1600, 1200) for _ in range(10)]
    lossless = np.stack([preprocess(encode_image(p, "RGB", "PNG"), 256) for p in pics]).astype(np.float64)
    jpeg = np.stack([preprocess(encode_image(p, "RGB", "JPEG", 90), 256) for p in pics]).astype(np.float64)
    print(
        json.dumps(
            {
                "figure": "jpeg_q90_error_after_crop_256",
                "set": "large 1600x1200",
                "mean_abs_levels": round(float(np.abs(lossless - jpeg).mean()), 3),
                "psnr_db": round(10 * np.log10(255**2 / float(((lossless - jpeg) ** 2).mean())), 2),
            }
        )
    )


if __name__ == "__main__":
    main()
