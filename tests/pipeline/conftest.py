"""Fixtures for the encode job: a synthetic ImageNet in every source layout, and dataset readers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zstandard

from latents.dataset import LatentIndex
from latents.format import decode_frame, flip_frame
from pipeline.job import EncodeConfig, EncodeSummary, RejectsExceededError, run_encode
from pipeline.synthetic import SyntheticImage, synthetic_images, write_imagefolder, write_parquet, write_wds

RESOLUTION = 64  # the job at 256/512 differs only in size; 64 keeps the tiny VAE fast on 2 cores
SHARD_SIZE = 16
MICRO_BATCH = 8


@pytest.fixture(scope="session")
def images() -> list[SyntheticImage]:
    """200 good images (4 classes, every mode, several sizes) and 4 broken files."""
    return synthetic_images(num_classes=4, per_class=50, seed=0, broken=4)


@pytest.fixture(scope="session")
def sources(tmp_path_factory, images) -> dict[str, tuple[str, dict[str, SyntheticImage]]]:
    """The same images as class folders, parquet shards and webdataset tars: layout -> (url, key -> image)."""
    root = tmp_path_factory.mktemp("sources")
    return {
        "imagefolder": (str(root / "train"), write_imagefolder(str(root / "train"), images)),
        "parquet": (str(root / "parquet"), write_parquet(str(root / "parquet"), images, files=2)),
        "wds": (str(root / "wds"), write_wds(str(root / "wds"), images, tars=3)),
    }


def read_latents(url: str) -> dict[str, tuple[int, np.ndarray]]:
    """key -> (label, (F, K, C, H, W) float16 array) of every sample of a complete dataset."""
    index = LatentIndex.open(url)
    spec = index.card.spec
    table = index.samples.to_pydict()
    names = index.shards.column("name").to_pylist()
    data = {n: index.root.read_bytes(n) for n in names}
    out, dec = {}, zstandard.ZstdDecompressor()
    for key, label, shard, offset, size, flip_offset in zip(
        table["key"], table["label"], table["shard"], table["offset"], table["size"], table["flip_offset"], strict=True
    ):
        member = data[names[shard]][offset : offset + size]
        frames = [decode_frame(flip_frame(member, f, flip_offset), spec, dec) for f in range(spec.num_flips)]
        out[key] = (label, np.stack(frames))
    return out


def dataset_files(url: str) -> dict[str, bytes]:
    """Every file under a local dataset root, by relative name."""
    root = Path(url)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def encode_config(src: str, dst: str, vae_dir: Path, **kw) -> EncodeConfig:
    """The tests' encode settings: small crops, small shards and micro-batches, no progress bar."""
    kw = {"resolution": RESOLUTION, "shard_size": SHARD_SIZE, "micro_batch": MICRO_BATCH, "progress": False, **kw}
    return EncodeConfig(src, dst, **{"vae": str(vae_dir), **kw})


@dataclass
class EncodedFolder:
    url: str
    first_error: Exception  # the first run, at the default reject threshold
    summary: EncodeSummary  # the second run, which accepts the rejects


@pytest.fixture(scope="session")
def encoded_folder(ray_address, sources, tiny_vae_dir, tmp_path_factory) -> EncodedFolder:
    """The class folders encoded without interruption: first at the default threshold (4 rejects of 204
    exceed 0.1%: the run fails after committing every shard), then again accepting them (adopts them all)."""
    url = str(tmp_path_factory.mktemp("encoded") / "folder")
    src = sources["imagefolder"][0]
    with pytest.raises(RejectsExceededError) as err:
        run_encode(encode_config(src, url, tiny_vae_dir))
    summary = run_encode(encode_config(src, url, tiny_vae_dir, max_reject_fraction=0.05))
    return EncodedFolder(url, err.value, summary)


def assert_fp16_close(stored: np.ndarray, exact: np.ndarray) -> None:
    """``stored`` (float16) is ``exact`` (float32) rounded, up to the float32 noise of another batch.

    Rounding to float16 moves a value by at most half its float16 spacing; we allow one spacing, plus
    1e-5 of the array's largest magnitude for float32 results that depend on the batch a sample was
    encoded in and on the memory layout (measured: below 1e-5 for these VAEs).
    """
    stored, exact = np.asarray(stored, np.float64), np.asarray(exact, np.float64)
    spacing = np.spacing(np.abs(exact).astype(np.float16)).astype(np.float64)
    error = np.abs(stored - exact)
    bound = spacing + 1e-5 * np.abs(exact).max()
    assert np.all(error <= bound), f"max error {(error / bound).max():.2f} of the bound"
