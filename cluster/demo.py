"""`sit demo`: the whole system end to end on this machine (CPU, local Ray, local files).

Steps, each through the same code as the real jobs:

  1. images   a labelled synthetic image set (coloured shapes, one class per shape) in the
              ImageNet folder layout, with broken files among them
  2. vae      a small diffusers AutoencoderKL fitted to those images (the SD VAE cannot be
              downloaded here), saved and then used exactly as the pipeline uses the SD VAE
  3. encode   the Ray encoding job (`sit encode`): broken files land in its rejects table
  4. train    the trainer (`python -m trainer.train`, FSDP2 on one process), stopped half-way
              with SIGTERM as a preempted cloud job would be, then resumed from its checkpoint
  5. sample   the Ray sampling job (`sit sample`) with the untrained and the trained model; the
              Fréchet distance between generated and data latents, before and after training
  6. report   grid.png (one labelled row per class), loss.png, summary.json and summary.md

Running it again into the same folder reuses every finished step (the jobs' own resume:
committed shards, checkpoints and sample chunks are kept); --fresh starts clean.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from latents.argtypes import positive_int

if TYPE_CHECKING:  # numpy is imported where used: `sit --help` imports this module
    import numpy as np


class DemoError(RuntimeError):
    """A step of the demo failed; the message names the step and where its output is."""


@dataclass(frozen=True)
class DemoSize:
    per_class: int  # good images per class
    vae_steps: int  # VAE fitting steps
    train_steps: int  # SiT optimizer steps
    checkpoint_every: int
    samples_per_class: int  # generated per class for the Fréchet distance and the grid


SIZES = {
    "full": DemoSize(per_class=400, vae_steps=400, train_steps=1200, checkpoint_every=200, samples_per_class=64),
    "quick": DemoSize(per_class=40, vae_steps=40, train_steps=40, checkpoint_every=10, samples_per_class=8),
}
IMAGE_SIZE = 64  # the generated pictures
RESOLUTION = 32  # the encode job's ADM crop (the VAE downsamples by 4: 8x8 latents)
GRID_COLUMNS = 8


class Log:
    def __init__(self, out: Path):
        self.start = time.perf_counter()
        self.file = open(out / "demo.log", "a")  # noqa: SIM115 - kept open for the run

    def __call__(self, message: str) -> None:
        line = f"[{time.perf_counter() - self.start:6.1f}s] {message}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def demo(args: argparse.Namespace) -> int:
    from cluster import demo_steps as steps
    from latents.artifacts import DEMO_SIZE_FILE, Kind, require_output
    from latents.threads import set_torch_threads
    from pipeline.ray_jobs import route_ray_logs

    require_output(args.out, Kind.DEMO, "--out")  # before --fresh deletes anything
    set_torch_threads()  # the VAE fit runs here: a loaded machine must not make it spin (latents.threads)
    size = SIZES["quick" if args.quick else "full"]
    if args.steps:
        size = DemoSize(**{**size.__dict__, "train_steps": args.steps})
    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    sized = out / DEMO_SIZE_FILE  # reusing steps is only right for a run of the same size
    if sized.exists() and json.loads(sized.read_text()) != size.__dict__:
        raise DemoError(f"{out} holds a demo of another size ({sized.read_text()}); pass --fresh or another --out")
    sized.write_text(json.dumps(size.__dict__))
    log = Log(out)
    route_ray_logs(str(out / "demo.log"))  # Ray's own log lines: in the run's log, not on the terminal
    log(f"sit demo into {out} ({'quick' if args.quick else 'full'} size; rerun reuses finished steps)")
    timings: dict[str, float] = {}

    def timed(name: str, fn, *a, **kw):
        t0 = time.perf_counter()
        result = fn(*a, **kw)
        timings[name] = round(time.perf_counter() - t0, 1)
        return result

    images = timed("images", steps.make_images, out, size, log)
    vae_dir = timed("vae", steps.make_vae, out, size, log)
    encoded = timed("encode", steps.encode, out, vae_dir, args.address, log)
    trained = timed("train", steps.train, out, size, encoded, log)
    sampled = timed("sample", steps.sample, out, size, vae_dir, trained, args.address, log)
    report = steps.write_report(out, size, images, encoded, trained, sampled, timings, log)
    log(f"report: {report}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the whole system end to end on a small synthetic set (CPU, local Ray, minutes)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="sit-demo", help="output folder (default: %(default)s)")
    p.add_argument(
        "--quick", action="store_true", help="a tiny run (under a minute of compute) for tests (default: off)"
    )
    p.add_argument("--fresh", action="store_true", help="delete the output folder first instead of reusing steps")
    p.add_argument("--steps", type=positive_int, help="training steps (default: 1200, or 40 with --quick)")
    p.add_argument("--address", help="Ray cluster to join (default: start a local one)")
    p.set_defaults(func=demo)


# ---- helpers the steps share ---------------------------------------------------------------------------


def chunk_latents(root: str) -> tuple[np.ndarray, np.ndarray]:
    """(latents (N, C, h, w) float32, labels (N,)) of a `sit sample --save-latents` output, in sample order."""
    import fsspec
    import numpy as np

    fs, path = fsspec.core.url_to_fs(root)
    latents, labels = {}, {}
    for name in sorted(fs.glob(f"{path}/chunks/chunk-*.tar")):
        with tarfile.open(fileobj=io.BytesIO(fs.cat_file(name))) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()
                if ext == "latent.npy":
                    latents[key] = np.load(io.BytesIO(data))
                elif ext == "cls":
                    labels[key] = int(data)
    keys = sorted(latents)
    return np.stack([latents[k] for k in keys]), np.array([labels[k] for k in keys])


def run_trainer(args: list[str], log, interrupt_at: int | None, metrics: Path) -> int:
    """`python -m trainer.train ARGS`; with ``interrupt_at``, SIGTERM once the log reaches that step."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = metrics.stat().st_size if metrics.exists() else 0  # only this run's lines count
    proc = subprocess.Popen([sys.executable, "-m", "trainer.train", *args], env=env)
    try:
        while proc.poll() is None:
            if interrupt_at is not None and last_step(metrics, start) >= interrupt_at:
                log(f"  sending SIGTERM at step {last_step(metrics, start)} (as a preempted cloud job would get)")
                proc.send_signal(signal.SIGTERM)
                interrupt_at = None
            time.sleep(0.05)
    except BaseException:
        proc.kill()
        raise
    return proc.returncode


def last_step(metrics: Path, start: int = 0) -> int:
    """The step of the last complete line of the trainer's metrics.jsonl written after byte
    ``start`` (the file may be mid-write)."""
    if not metrics.exists():
        return 0
    with open(metrics, "rb") as f:
        f.seek(start)
        complete = f.read().decode().rpartition("\n")[0]
    return json.loads(complete.rpartition("\n")[2])["step"] if complete else 0
