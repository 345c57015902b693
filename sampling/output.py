"""The output of `sit sample`: one owner for every name, member and array of it.

    OUT/run.json                    the run description, written before any chunk
    OUT/chunks/chunk-000000.tar     samples [0, chunk_size), one tar per chunk
    OUT/chunks/chunk-000001.tar     ...
    OUT/samples.npz                 written last, when every chunk exists: the ADM evaluator's
                                    input - arr_0 uint8 (N, H, W, 3) in sample order, arr_1 int64
                                    (N,) labels (as ADM's image_sample.py writes)
    OUT/labels.npy                  int64 (N,): the class of every sample, in order

A chunk tar holds, per sample i (key = i as 8 digits), in order: ``<key>.png`` (the RGB image),
``<key>.cls`` (the label as ASCII digits, webdataset convention) and, with ``--save-latents``,
``<key>.latent.npy`` (float32 (C, h, w), the scaled latents before decoding). Tar headers are
fixed (mtime 0, uid/gid 0, mode 0644), so a chunk's bytes depend only on its samples. A chunk is
published atomically (`latents.storage.Root.publish_bytes`): a chunk under its final name is
complete, so a rerun skips it. `run.json` is compared on every rerun: a different run's output
location is refused, naming the fields that differ.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator

import numpy as np
from PIL import Image

from latents.artifacts import SAMPLES_CHUNK_DIR, SAMPLES_FORMAT, SAMPLES_RUN_FILE
from latents.storage import TEMP_MARK, Root

FORMAT = SAMPLES_FORMAT  # these three are named in latents.artifacts, which tells the kinds of output apart
FORMAT_VERSION = 1
RUN_FILE = SAMPLES_RUN_FILE
CHUNK_DIR = SAMPLES_CHUNK_DIR
NPZ_FILE = "samples.npz"
LABELS_FILE = "labels.npy"
PNG_COMPRESS_LEVEL = 6  # fixed: PNG bytes must not depend on library defaults
_CHUNK_RE = re.compile(r"^chunks/chunk-(\d{6})\.tar$")


class RunMismatchError(ValueError):
    """The output location holds a different run's chunks; the message lists the differing fields."""


class SampleFormatError(ValueError):
    """A chunk or output file that is not what this format says; the message names it."""


def chunk_name(index: int) -> str:
    return f"{CHUNK_DIR}/chunk-{index:06d}.tar"


def chunk_range(index: int, chunk_size: int, num_samples: int) -> range:
    """The sample indices of chunk ``index``."""
    return range(index * chunk_size, min((index + 1) * chunk_size, num_samples))


def num_chunks(num_samples: int, chunk_size: int) -> int:
    return -(-num_samples // chunk_size)


def committed_chunks(root: Root) -> set[int]:
    """Indices of the chunks published under ``root`` (temporaries are not chunks)."""
    found = set()
    for name in root.list(CHUNK_DIR):
        m = _CHUNK_RE.match(name)
        if m:
            found.add(int(m.group(1)))
    return found


def claim_run(root: Root, description: dict) -> bool:
    """Write run.json, or check that the one there describes this run. True if it was there.

    `RunMismatchError` names every field whose value differs (a run's outputs are never mixed).
    """
    description = {"format": FORMAT, "format_version": FORMAT_VERSION, **description}
    if root.exists(RUN_FILE):
        found = json.loads(root.read_bytes(RUN_FILE))
        if found != description:
            there, now = _flatten(found), _flatten(description)
            diff = [
                f"{k}: there {there.get(k)!r}, now {now.get(k)!r}"
                for k in sorted(set(there) | set(now))
                if there.get(k) != now.get(k)
            ]
            raise RunMismatchError(
                f"{root.url} holds another run's samples ({'; '.join(diff)}); use another output location"
            )
        return True
    if committed_chunks(root):
        raise RunMismatchError(f"{root.url} holds chunks but no {RUN_FILE}: not an output of this run")
    root.publish_bytes(RUN_FILE, (json.dumps(description, indent=1, sort_keys=True) + "\n").encode())
    return False


def _flatten(d: dict, prefix: str = "") -> dict:
    """{"sampler": {"num_steps": 250}} -> {"sampler.num_steps": 250}"""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def chunk_bytes(indices: range, images: np.ndarray, labels: np.ndarray, latents: np.ndarray | None = None) -> bytes:
    """The tar of one chunk: images uint8 (n, H, W, 3), labels (n,), optional latents (n, C, h, w)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for j, i in enumerate(indices):
            key = f"{i:08d}"
            _add(tar, f"{key}.png", png_bytes(images[j]))
            _add(tar, f"{key}.cls", str(int(labels[j])).encode())
            if latents is not None:
                npy = io.BytesIO()
                np.save(npy, latents[j].astype(np.float32))
                _add(tar, f"{key}.latent.npy", npy.getvalue())
    return buf.getvalue()


def read_chunk(data: bytes, name: str, indices: range) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, H, W, 3), labels int64 (n,)) of a chunk tar, checked against ``indices``."""
    images, labels = {}, {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            payload = tar.extractfile(member).read()
            if ext == "png":
                images[key] = np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"))
            elif ext == "cls":
                labels[key] = int(payload)
    keys = [f"{i:08d}" for i in indices]
    missing = [k for k in keys if k not in images or k not in labels]
    if missing or len(images) != len(keys):
        raise SampleFormatError(f"{name}: expected samples {keys[0]}..{keys[-1]}, missing {missing[:5]}")
    return np.stack([images[k] for k in keys]), np.array([labels[k] for k in keys], dtype=np.int64)


def _npy_header(f, shape: tuple[int, ...], dtype: np.dtype) -> None:
    np.lib.format.write_array_header_1_0(
        f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    )


def assemble(root: Root, num_samples: int, chunk_size: int, image_shape: tuple[int, int, int]) -> Iterator[int]:
    """Write samples.npz and labels.npy from the chunks, one chunk in memory at a time.

    The npz is streamed into a local temporary file (uncompressed zip, as numpy's savez), then
    published: renamed on local disks, uploaded in one multipart upload on object stores. Yields
    the number of samples written after each chunk (for progress).
    """
    labels = np.empty(num_samples, dtype=np.int64)  # 8 bytes a sample: fine to hold
    fd, tmp = tempfile.mkstemp(prefix=f"{NPZ_FILE}{TEMP_MARK}", dir=_temp_dir(root))  # swept by a rerun
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open(_member("arr_0.npy"), "w", force_zip64=True) as f:
                _npy_header(f, (num_samples, *image_shape), np.dtype(np.uint8))
                done = 0
                for c in range(num_chunks(num_samples, chunk_size)):
                    indices = chunk_range(c, chunk_size, num_samples)
                    name = chunk_name(c)
                    images, chunk_labels = read_chunk(root.read_bytes(name), root.url_of(name), indices)
                    if images.shape[1:] != image_shape:
                        raise SampleFormatError(
                            f"{root.url_of(name)}: images {images.shape[1:]}, expected {image_shape}"
                        )
                    f.write(np.ascontiguousarray(images).tobytes())
                    labels[indices.start : indices.stop] = chunk_labels
                    done += len(indices)
                    yield done
            with zf.open(_member("arr_1.npy"), "w", force_zip64=True) as f:
                _npy_header(f, (num_samples,), labels.dtype)
                f.write(labels.tobytes())
        labels_buf = io.BytesIO()
        np.save(labels_buf, labels)
        root.publish_bytes(LABELS_FILE, labels_buf.getvalue())
        _publish_file(root, tmp, NPZ_FILE)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _member(name: str) -> zipfile.ZipInfo:
    """A zip member with a fixed timestamp: the npz's bytes depend on its arrays only."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.external_attr = 0o644 << 16
    return info


def _temp_dir(root: Root) -> str | None:
    """Local roots: a temporary next to the output (same filesystem, so the rename is atomic)."""
    if root.is_local:
        os.makedirs(root.path, exist_ok=True)
        return root.path
    return None


def _publish_file(root: Root, local: str, name: str) -> None:
    if root.is_local:
        os.chmod(local, 0o644)  # mkstemp makes it private
        os.replace(local, root.full(name))
    else:  # s3fs/gcsfs: a multipart upload whose completion comes last (atomic)
        root.fs.put_file(local, root.full(name))


def is_complete(root: Root) -> bool:
    """Whether the samples npz exists (it is written after every chunk)."""
    return root.exists(NPZ_FILE)
