"""`sit encode`'s driver at scale: peak memory and listing time on a folder of N images.

Builds, under ``workdir``, an ImageNet-layout folder (1,000 class folders) of N hard links to a
hundred small JPEGs (ext4 allows ~65,000 links per inode), then measures, each in a fresh process:

* ``encode_driver_peak_rss_mib`` / ``encode_limit64_wall_s``: ``sit encode --limit 64`` with the
  tiny VAE (a local Ray started by the job); the driver's peak RSS is its own ``VmHWM`` at exit
  (Ray's processes are not the driver).
* ``encode_listing_limit64_s``: `pipeline.sources.scan` with ``limit=64``, as the job lists.
* ``encode_full_listing_s`` / ``encode_full_listing_peak_rss_mib``: the whole source listed once
  (what a job without ``--limit`` does before planning): time and peak RSS of that process.

`encode_figures(n, workdir)` returns one dict per figure (``tests/benchmarks/bench_scale.py`` calls
it); run as a script it prints one JSON line per figure for N = 1,280,000 and 5,000,000 and
deletes its data::

    python tests/benchmarks/scale_encode.py [--sizes 1280000 5000000] [--workdir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLASSES = 1000
SOURCE_FILES = 100  # 5M links over 100 inodes: 50,000 each, under ext4's ~65,000

# the driver's own peak RSS (VmHWM), printed at exit as the last stderr line
_PEAK_AT_EXIT = (
    "import atexit, runpy, sys\n"
    "def _peak():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            print('PEAK_KIB', line.split()[1], file=sys.stderr, flush=True)\n"
    "atexit.register(_peak)\n"
)


def build_folder(root: Path, n: int) -> Path:
    """``root/train/<wnid>/<wnid>_<j>.JPEG``: n hard links to SOURCE_FILES small JPEGs."""
    import numpy as np

    from pipeline.synthetic import encode_image, picture

    rng = np.random.default_rng(0)
    sources = root / "jpegs"
    sources.mkdir(parents=True)
    files = []
    for i in range(SOURCE_FILES):
        path = sources / f"{i:03d}.JPEG"
        path.write_bytes(encode_image(picture(rng, 64, 48), "RGB", "JPEG"))
        files.append(str(path))
    train = root / "train"

    def link_class(c: int) -> None:
        folder = train / f"n{c:08d}"
        folder.mkdir(parents=True)
        for j in range(n // CLASSES + (1 if c < n % CLASSES else 0)):
            os.link(files[(c + j) % SOURCE_FILES], folder / f"n{c:08d}_{j}.JPEG")

    with ThreadPoolExecutor(8) as pool:  # link() is a system call: threads overlap them
        list(pool.map(link_class, range(CLASSES)))
    return train


def remove(root: Path) -> None:
    train = root / "train"
    if train.is_dir():
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda d: shutil.rmtree(d, ignore_errors=True), list(train.iterdir())))
    shutil.rmtree(root, ignore_errors=True)


def _run(code: str, *args: str) -> tuple[float, float, str]:
    """Run python ``code`` (argv ``args``) in a fresh process: (wall s, peak RSS MiB, stdout)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_AT_EXIT + code, *args], capture_output=True, text=True, env=env, cwd=REPO
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{args}: exit {proc.returncode}: {proc.stderr[-2000:]}")
    peak = [line for line in proc.stderr.splitlines() if line.startswith("PEAK_KIB")][-1]
    return wall, int(peak.split()[1]) / 1024, proc.stdout


def encode_figures(n: int, workdir: str) -> list[dict]:
    """Build the folder of n images under ``workdir``, measure, delete; one dict per figure."""
    root = Path(tempfile.mkdtemp(prefix="scale-encode-", dir=workdir))
    try:
        start = time.perf_counter()
        train = build_folder(root, n)
        build_s = time.perf_counter() - start
        sys.path.insert(0, str(REPO))
        from tests.conftest import save_tiny_vae

        vae = save_tiny_vae(root / "tiny-vae")
        scan = (
            "import json, sys, time\n"
            "from pipeline.sources import scan\n"
            "t = time.perf_counter()\n"
            "listing = scan(sys.argv[1], limit=None if sys.argv[2] == 'all' else int(sys.argv[2]))\n"
            "print(json.dumps({'s': time.perf_counter() - t, 'items': listing.num_items}))\n"
        )
        _, _, out = _run(scan, str(train), "64")
        limit_s = json.loads(out)["s"]
        wall, rss, _ = _run(
            "sys.argv[0] = 'sit'; runpy.run_module('cluster.cli', run_name='__main__')",
            "encode", str(train), str(root / "out"), "--limit", "64", "--resolution", "32",
            "--vae", str(vae), "--micro-batch", "16", "--quiet",
        )  # fmt: skip
        _, full_rss, out = _run(scan, str(train), "all")
        full = json.loads(out)
        assert full["items"] == n, full
        base = {"n": n, "machine": machine()}
        return [
            {"figure": "encode_driver_peak_rss_mib", **base, "value": round(rss, 1)},
            {"figure": "encode_limit64_wall_s", **base, "value": round(wall, 2)},
            {"figure": "encode_listing_limit64_s", **base, "value": round(limit_s, 3)},
            {"figure": "encode_full_listing_s", **base, "value": round(full["s"], 2)},
            {"figure": "encode_full_listing_peak_rss_mib", **base, "value": round(full_rss, 1)},
            {"figure": "encode_build_folder_s", **base, "value": round(build_s, 1)},
        ]
    finally:
        remove(root)


def machine() -> str:
    cores, mem = os.cpu_count(), os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cores}-core CPU, {mem:.0f} GB, load {os.getloadavg()[0]:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_280_000, 5_000_000])
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    args = parser.parse_args()
    for n in args.sizes:
        for figure in encode_figures(n, args.workdir):
            print(json.dumps(figure), flush=True)


if __name__ == "__main__":
    main()
