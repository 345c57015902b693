"""Image sets for `sit eval`, read in batches without holding a whole set in memory.

A source is one of (local path or fsspec URL):

* an ``.npz`` with ``arr_0`` uint8 (N, H, W, 3) (the ADM evaluator's sample and reference
  batches): ``arr_0`` is streamed from the zip member, a batch at a time;
* an output directory of `sit sample` (its ``samples.npz``);
* a directory of image files (png, jpg, jpeg, webp, bmp), read in sorted name order and
  converted to RGB (all the same size).

A reference may instead be statistics: an ``.npz`` with ``mu`` and ``sigma`` (the ADM reference
batches carry both images and statistics; statistics are used when present).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import numpy as np
from PIL import Image

from sampling.output import NPZ_FILE

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ImageSourceError(ValueError):
    """A samples or reference source that cannot be read as images; the message names it."""


@dataclass
class ImageSource:
    """Batches of uint8 (n, H, W, 3) images from one place."""

    url: str
    count: int
    kind: str  # "npz" | "folder"
    _files: list[str] | None = None

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        n = self.count if limit is None else min(limit, self.count)
        if self.kind == "npz":
            yield from _npz_batches(self.url, batch_size, n)
        else:
            for start in range(0, n, batch_size):
                yield np.stack([_read_image(f) for f in self._files[start : min(start + batch_size, n)]])


def _npz_member(zf: zipfile.ZipFile, url: str, key: str):
    name = f"{key}.npy"
    if name not in zf.namelist():
        raise ImageSourceError(f"{url}: no {key!r} array (has {[n.removesuffix('.npy') for n in zf.namelist()]})")
    f = zf.open(name)
    major, _ = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(f)
    return f, shape, fortran, dtype


def _npz_batches(url: str, batch_size: int, n: int) -> Iterator[np.ndarray]:
    with fsspec.open(url, "rb") as raw, zipfile.ZipFile(raw) as zf:
        f, shape, _, dtype = _npz_member(zf, url, "arr_0")
        per_image = int(np.prod(shape[1:])) * dtype.itemsize
        for start in range(0, n, batch_size):
            m = min(batch_size, n - start)
            data = f.read(m * per_image)
            yield np.frombuffer(bytearray(data), dtype=dtype).reshape(m, *shape[1:])


def _read_image(url: str) -> np.ndarray:
    with fsspec.open(url, "rb") as f:
        try:
            return np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB"))
        except OSError as err:
            raise ImageSourceError(f"{url}: not a readable image ({err})") from None


def npz_keys(url: str) -> list[str]:
    with fsspec.open(url, "rb") as raw, zipfile.ZipFile(raw) as zf:
        return [n.removesuffix(".npy") for n in zf.namelist()]


def read_npz_arrays(url: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Small arrays (statistics) of an npz."""
    with fsspec.open(url, "rb") as raw, np.load(raw) as data:
        return {k: np.asarray(data[k]) for k in keys}


def open_images(url: str) -> ImageSource:
    """The image set at ``url`` (npz, `sit sample` output or image folder)."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"not found: {url}")
    if fs.isdir(path):
        if fs.exists(f"{path}/{NPZ_FILE}"):
            return open_images(url.rstrip("/") + f"/{NPZ_FILE}")
        files = sorted(f for f in fs.find(path) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            raise ImageSourceError(f"{url}: no {NPZ_FILE} and no image files ({', '.join(IMAGE_EXTENSIONS)})")
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        urls = files if protocol in ("file", "local") else [f"{protocol}://{f}" for f in files]
        return ImageSource(url, len(urls), "folder", urls)
    if not path.endswith(".npz"):
        raise ImageSourceError(f"{url}: expected an .npz file or a directory")
    with fsspec.open(url, "rb") as raw, zipfile.ZipFile(raw) as zf:
        f, shape, fortran, dtype = _npz_member(zf, url, "arr_0")
        f.close()
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
        raise ImageSourceError(f"{url}: arr_0 is {dtype} {shape}; expected uint8 (N, H, W, 3) in C order")
    return ImageSource(url, shape[0], "npz")
