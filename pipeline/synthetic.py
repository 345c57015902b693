"""A small synthetic ImageNet: images of several sizes and every PIL mode, plus broken files.

For tests, benchmarks and `sit demo`. The same images can be written in each source layout
(ILSVRC train folders, Hugging Face-style parquet shards, webdataset tars), so that encoding them
from each must give the same latents. Everything is a function of the seed.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

# (mode, file format) pairs cycled through; JPEG where PIL writes the mode as JPEG, else PNG/TIFF/GIF
MODES = (
    ("RGB", "JPEG"),
    ("L", "JPEG"),
    ("CMYK", "JPEG"),
    ("RGB", "PNG"),
    ("RGBA", "PNG"),
    ("P", "PNG"),
    ("LA", "PNG"),
    ("I;16", "PNG"),
    ("1", "PNG"),
    ("P", "GIF"),
    ("RGB", "WEBP"),
    ("I", "TIFF"),
)
# (width, height): ImageNet-like, larger than 2x the crop (halved first), smaller than the crop (upscaled)
SIZES = ((500, 375), (375, 500), (333, 500), (640, 480), (1200, 900), (160, 120), (90, 200), (257, 256))
BROKEN = ("empty", "truncated", "not-an-image")
EXTENSIONS = {"JPEG": ".JPEG", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "TIFF": ".tif"}


@dataclass(frozen=True)
class SyntheticImage:
    wnid: str  # class folder name, e.g. n00000003
    label: int  # index of the wnid among the sorted wnids
    name: str  # file name, e.g. n00000003_0007.JPEG
    data: bytes
    broken: str = ""  # the reject reason this file must get, "" if it is a good image

    @property
    def stem(self) -> str:
        return self.name.split(".", 1)[0]


def picture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Smooth colour fields with some edges: compresses like a photo, unlike white noise."""
    coarse = rng.integers(0, 256, size=(max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    y0, x0 = rng.integers(0, height), rng.integers(0, width)
    image[y0 : y0 + height // 4, x0 : x0 + width // 5] = rng.integers(0, 256, size=3)
    image += rng.integers(-6, 7, size=image.shape, dtype=np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


def encode_image(rgb: np.ndarray, mode: str, fmt: str, quality: int = 90) -> bytes:
    """An RGB array saved in ``mode`` as ``fmt``."""
    image = Image.fromarray(rgb)
    if mode in ("I;16", "I"):
        image = Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)
        image = image.convert("I") if mode == "I" else image
    elif mode == "P":
        image = image.quantize(colors=64, method=Image.Quantize.FASTOCTREE)
    elif mode == "RGBA":
        image = image.convert("RGBA")
        image.putalpha(Image.fromarray(rgb[..., 0]))
    else:
        image = image.convert(mode)
    buf = io.BytesIO()
    options = {"JPEG": {"quality": quality}, "WEBP": {"quality": quality, "method": 0}, "PNG": {"compress_level": 1}}
    image.save(buf, format=fmt, **options.get(fmt, {}))
    return buf.getvalue()


def synthetic_images(num_classes: int = 4, per_class: int = 24, seed: int = 0, broken: int = 3) -> list[SyntheticImage]:
    """``num_classes * per_class`` good images cycling through MODES and SIZES, plus ``broken`` bad files."""
    rng = np.random.default_rng(seed)
    images = []
    for label in range(num_classes):
        wnid = f"n{label:08d}"
        for i in range(per_class):
            n = label * per_class + i
            mode, fmt = MODES[n % len(MODES)]
            width, height = SIZES[(n // len(MODES) + n) % len(SIZES)]
            data = encode_image(picture(rng, width, height), mode, fmt)
            images.append(SyntheticImage(wnid, label, f"{wnid}_{i:04d}{EXTENSIONS[fmt]}", data))
    good_jpeg = next(im.data for im in images if im.name.endswith(".JPEG"))
    bad = {"empty": b"", "truncated": good_jpeg[: len(good_jpeg) // 2], "not-an-image": b"this is not an image\n"}
    for b in range(broken):
        reason = BROKEN[b % len(BROKEN)]
        label = b % num_classes
        wnid = f"n{label:08d}"
        images.append(SyntheticImage(wnid, label, f"{wnid}_bad{b:03d}.JPEG", bad[reason], reason))
    return images


def write_imagefolder(url: str, images: list[SyntheticImage]) -> dict[str, SyntheticImage]:
    """ILSVRC train layout ``url/<wnid>/<name>``; returns key -> image."""
    fs, root = fsspec.core.url_to_fs(url)
    for im in images:
        fs.makedirs(f"{root}/{im.wnid}", exist_ok=True)
        fs.pipe_file(f"{root}/{im.wnid}/{im.name}", im.data)
    return {f"{im.wnid}/{im.stem}": im for im in images}


def write_parquet(url: str, images: list[SyntheticImage], files: int = 2) -> dict[str, SyntheticImage]:
    """Hugging Face-style parquet shards (``image`` struct of bytes/path, ``label``); returns key -> image."""
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    keys = {}
    per_file = -(-len(images) // files)
    for f in range(files):
        part = images[f * per_file : (f + 1) * per_file]
        table = pa.table(
            {
                "image": [{"bytes": im.data, "path": im.name} for im in part],
                "label": pa.array([im.label for im in part], pa.int64()),
            }
        )
        stem = f"train-{f:05d}-of-{files:05d}"
        with fs.open(f"{root}/{stem}.parquet", "wb") as out:
            pq.write_table(table, out, row_group_size=16)
        keys.update({f"{stem.replace('.', '_')}/{row:08d}": im for row, im in enumerate(part)})
    return keys


def write_wds(url: str, images: list[SyntheticImage], tars: int = 2) -> dict[str, SyntheticImage]:
    """Webdataset tars of ``<key>.<ext>`` + ``<key>.cls``; returns key -> image."""
    import tarfile

    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    keys = {}
    per_tar = -(-len(images) // tars)
    for t in range(tars):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for im in images[t * per_tar : (t + 1) * per_tar]:
                ext = "." + im.name.split(".", 1)[1].lower()
                for name, data in ((im.stem + ext, im.data), (im.stem + ".cls", str(im.label).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                keys[f"shard-{t:04d}/{im.stem}"] = im
        fs.pipe_file(f"{root}/shard-{t:04d}.tar", buf.getvalue())
    return keys
