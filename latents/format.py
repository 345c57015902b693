"""The latent dataset format: the one owner of names, schemas, dtypes, shapes and encodings.

Writer, reader, verifier and inspector all import from here. SPEC.md (beside this file) is the
prose version; keep the two in step and bump FORMAT_VERSION on any incompatible change.

Layout under a dataset root URL (local path, file://, s3://, gs://, memory://):

    card.json          written last: "card exists" means "dataset complete"
    manifest.parquet   one row per shard (SHARD_SCHEMA)
    samples.parquet    one row per sample (SAMPLE_SCHEMA), ordered by shard, then position
    rejects.parquet    optional, by the encode job: inputs it could not encode (REJECTS_SCHEMA)
    shards/000000.tar  tar shards; per sample, in order:
        {key}.latents.zst  one zstd frame per stored flip (flip 0 = image, flip 1 = its mirror),
                           concatenated; each frame is an .npy file of shape (K, C, H, W) in the
                           storage dtype, K = 2 (posterior mean, std) or 1 (one sampled latent,
                           or the latent of a deterministic autoencoder)
        {key}.cls          the class label, ASCII decimal

Also here: the card's field checks, the sample checks writers apply, the tar member layout
(`tar_header`, `read_tar`: the one tar parser) and the per-sample seed (`sample_seeds`).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import tarfile
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import cached_property
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from latents.autoencoder import SD_VAE_CLASS, LatentNorm, LatentTransform, dataset_transform

FORMAT_NAME = "sit-latents"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: SD-VAE only (scaling_factor, no autoencoder or transform fields)

CARD_NAME = "card.json"
MANIFEST_NAME = "manifest.parquet"
SAMPLES_NAME = "samples.parquet"
REJECTS_NAME = "rejects.parquet"  # optional, owned by the encode job: inputs it could not encode
SHARD_DIR = "shards"
INDEX_NAMES = (SAMPLES_NAME, MANIFEST_NAME, CARD_NAME)  # published in this order, after every shard

LATENTS_SUFFIX = ".latents.zst"
LABEL_SUFFIX = ".cls"
STORAGE_DTYPE = "float16"  # 2^-11 relative rounding: 16x finer than the bf16 used in training
STORED_POSTERIOR = "posterior"  # K = 2: mean and std of the VAE posterior
STORED_SAMPLE = "sample"  # K = 1: one sampled latent
STORED_LATENT = "latent"  # K = 1: the latent of a deterministic autoencoder (DC-AE, RAE); version 2
STORED_KINDS = (STORED_POSTERIOR, STORED_SAMPLE, STORED_LATENT)
ZSTD_LEVEL = 3
CODEC = f"zstd-{ZSTD_LEVEL}+npy"
TAR_BLOCK = 512  # ustar block: headers and padded member data
TAR_RECORD = 20 * TAR_BLOCK  # archives are padded to a multiple of it
DEFAULT_SHARD_BYTES = 256 * 2**20  # target shard size (uncompressed estimate)
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-/]{1,88}$")  # no '.', so webdataset splits key/suffix right

SHARD_SCHEMA = pa.schema(
    [
        ("shard", pa.int32()),  # shard index
        ("name", pa.string()),  # path relative to the root, e.g. shards/000000.tar
        ("num_samples", pa.int64()),
        ("bytes", pa.int64()),  # file size
        ("sha256", pa.string()),  # hex digest of the whole file
        ("first_sample", pa.int64()),  # row of its first sample in samples.parquet
    ]
)
SAMPLE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("label", pa.int32()),
        ("shard", pa.int32()),
        ("offset", pa.int64()),  # byte offset of the .latents.zst member's data in the shard
        ("size", pa.int32()),  # its size in bytes
        ("flip_offset", pa.int32()),  # start of the flip-1 frame within the member (0: no flip stored)
        ("key_hash", pa.uint64()),  # key_hash(key): seeds the per-sample flip and noise
    ]
)

REJECTS_SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # the sample key the input would have had
        ("source", pa.string()),  # source path or URL of the input
        ("reason", pa.string()),  # short category, e.g. "decode", "too-small"
        ("error", pa.string()),  # the exception text
    ]
)


class DatasetError(Exception):
    """Base class: something is wrong with a dataset; the message names the URL, shard or key."""


class IncompleteDatasetError(DatasetError):
    """The dataset has no card: still being written, or its writer failed."""


class UnsupportedFormatError(DatasetError):
    """The card's format or version is not one this code reads."""


class ShardError(DatasetError):
    """A shard (or a sample in it) is missing, truncated, corrupt or of the wrong shape."""


def shard_name(index: int) -> str:
    return f"{SHARD_DIR}/{index:06d}.tar"


def key_hash(key: str) -> int:
    """Stable 64-bit hash of a sample key (process- and platform-independent)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def key_hashes(keys) -> np.ndarray:
    """`key_hash` of many keys (a list of str or an arrow string array) as one uint64 array:
    the 8-byte digests are joined and read as little-endian, with no Python int per key."""
    if isinstance(keys, (pa.Array, pa.ChunkedArray)):
        keys = keys.to_pylist()
    digests = b"".join(hashlib.blake2b(k.encode(), digest_size=8).digest() for k in keys)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def check_key(key: str) -> str:
    if not KEY_PATTERN.match(key):
        raise ValueError(f"sample key {key!r} must match {KEY_PATTERN.pattern} (letters, digits, _ - /; no dots)")
    return key


@dataclass(frozen=True)
class LatentSpec:
    """What one stored sample holds."""

    latent_shape: tuple[int, int, int]  # (C, H, W), e.g. (4, 32, 32) at 256 px
    stored: str = STORED_POSTERIOR  # "posterior" (mean + std), "sample" or "latent" (deterministic)
    flips: bool = True  # the horizontal mirror is stored too
    storage_dtype: str = STORAGE_DTYPE

    def __post_init__(self):
        if self.stored not in STORED_KINDS:
            raise ValueError(f"stored must be one of {', '.join(STORED_KINDS)}, not {self.stored!r}")
        if self.storage_dtype != STORAGE_DTYPE:
            raise ValueError(f"storage dtype must be {STORAGE_DTYPE}, not {self.storage_dtype}")
        object.__setattr__(self, "latent_shape", tuple(int(s) for s in self.latent_shape))

    @property
    def num_flips(self) -> int:
        return 2 if self.flips else 1

    @property
    def frame_shape(self) -> tuple[int, ...]:
        """Shape of one flip's array: (K, C, H, W)."""
        return (2 if self.stored == STORED_POSTERIOR else 1, *self.latent_shape)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape the writer accepts per sample: (F, K, C, H, W)."""
        return (self.num_flips, *self.frame_shape)

    @cached_property
    def raw_sample_bytes(self) -> int:
        return int(np.prod(self.sample_shape)) * np.dtype(self.storage_dtype).itemsize

    @cached_property
    def frame_bytes(self) -> int:
        """Decompressed size of one flip's frame: .npy header + array."""
        return len(self.npy_header) + self.raw_sample_bytes // self.num_flips

    @cached_property
    def npy_header(self) -> bytes:
        """The exact .npy header every frame starts with (checks dtype and shape in one compare)."""
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            buf, {"descr": np.dtype(self.storage_dtype).str, "fortran_order": False, "shape": self.frame_shape}
        )
        return buf.getvalue()

    def samples_per_shard(self, shard_bytes: int = DEFAULT_SHARD_BYTES) -> int:
        """Shard size by bytes: samples per shard from the uncompressed size (zstd only shrinks it)."""
        return max(1, shard_bytes // self.raw_sample_bytes)


V1_ONLY = ("scaling_factor",)  # version-1 card fields that version 2 replaced (by autoencoder + transform)
V2_ONLY = ("autoencoder", "transform")


@dataclass(kw_only=True)
class DatasetCard:
    """card.json: what the dataset is. Written last; its presence means the dataset is complete."""

    resolution: int  # image side the latents were encoded from (256, 512)
    latent_shape: list[int]  # stored (C, H, W), before the transform
    stored: str  # "posterior", "sample" or "latent" (deterministic autoencoder)
    flips: bool  # horizontal mirrors stored
    vae: str  # autoencoder id as given to `sit encode`, e.g. stabilityai/sd-vae-ft-ema
    autoencoder: dict  # {"class": diffusers class, "config_sha256": hash of its config} (v1: AutoencoderKL, "")
    transform: dict  # the autoencoder's own stored -> model transform (latents.autoencoder.LatentTransform)
    num_classes: int
    num_samples: int
    num_shards: int
    total_bytes: int  # shard bytes
    channel_mean: list[float]  # per-channel mean of the stored latent distribution (float64 sums, both flips)
    channel_std: list[float]  # per-channel std of it (posterior variance included)
    source_fingerprint: str  # identifies the source images (set by the encoder)
    tool_version: str  # what wrote it
    storage_dtype: str = STORAGE_DTYPE
    codec: str = CODEC
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)  # free-form provenance (encoder settings, ...)

    @property
    def spec(self) -> LatentSpec:
        return LatentSpec(tuple(self.latent_shape), self.stored, self.flips, self.storage_dtype)

    @property
    def latent_transform(self) -> LatentTransform:
        """The autoencoder's own transform: what the reader applies unless told otherwise."""
        return LatentTransform.from_dict(self.transform)

    def model_transform(self, norm: LatentNorm = LatentNorm.VAE) -> LatentTransform:
        """The transform to train in: the autoencoder's own, or (z - mean_c) / std_c from this card's statistics."""
        if norm is LatentNorm.DATASET:
            return dataset_transform(self.latent_transform, self.channel_mean, self.channel_std)
        return self.latent_transform

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str = CARD_NAME) -> DatasetCard:
        """Parse and check a card: every field's type and range; errors name ``where`` and the field."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DatasetError(f"{where}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise DatasetError(f"{where}: must hold a JSON object, not a {type(data).__name__}")
        if data.get("format") != FORMAT_NAME:
            raise UnsupportedFormatError(f"{where}: format {data.get('format')!r} is not {FORMAT_NAME!r}")
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            raise UnsupportedFormatError(
                f"{where}: format version {version!r} is not supported "
                f"(this code reads versions {', '.join(map(str, READABLE_VERSIONS))})"
            )
        names = {f.name for f in fields(cls)}
        names = (names - set(V2_ONLY)) | set(V1_ONLY) if version == 1 else names
        optional = {f.name for f in fields(cls) if f.default is not MISSING or f.default_factory is not MISSING}
        missing = sorted(n for n in names if n not in data and n not in optional)
        unknown = sorted(set(data) - names)
        if missing or unknown:
            raise DatasetError(f"{where}: missing fields {missing}, unknown fields {unknown}")
        problems = [p for name, value in data.items() if (p := _check_field(name, value, data)) is not None]
        if problems:
            raise DatasetError(f"{where}: " + "; ".join(problems))
        if version == 1:  # SD-VAE latents: the reader multiplied by scaling_factor
            scale = data.pop("scaling_factor")
            data["autoencoder"] = {"class": SD_VAE_CLASS, "config_sha256": ""}
            data["transform"] = LatentTransform(scale=scale).to_dict()
        return cls(**data)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _check_field(name: str, v, card: dict) -> str | None:
    """What is wrong with card field ``name`` = ``v`` (None if nothing)."""
    shape = card.get("latent_shape")
    channels = shape[0] if isinstance(shape, list) and shape and _is_int(shape[0]) else None
    positive_int = ("resolution", "num_classes", "num_samples", "num_shards")
    if name in positive_int and not (_is_int(v) and v >= 1):
        return f"{name} must be a positive integer, not {v!r}"
    if name == "total_bytes" and not (_is_int(v) and v >= 0):
        return f"{name} must be a non-negative integer, not {v!r}"
    if name == "latent_shape" and not (isinstance(v, list) and len(v) == 3 and all(_is_int(x) and x >= 1 for x in v)):
        return f"latent_shape must be a list of 3 positive integers [C, H, W], not {v!r}"
    if name == "scaling_factor" and not (_is_number(v) and v > 0):
        return f"scaling_factor must be a finite positive number, not {v!r}"
    kinds = STORED_KINDS if card.get("format_version") != 1 else (STORED_POSTERIOR, STORED_SAMPLE)
    if name == "stored" and v not in kinds:
        return f"stored must be one of {', '.join(kinds)}, not {v!r}"
    if name == "autoencoder" and not (
        isinstance(v, dict) and set(v) == {"class", "config_sha256"} and all(isinstance(x, str) for x in v.values())
    ):
        return f"autoencoder must be an object of class and config_sha256 strings, not {v!r}"
    if name == "transform":
        try:
            LatentTransform.from_dict(v)
        except ValueError as err:
            return f"transform: {err}"
    if name == "flips" and not isinstance(v, bool):
        return f"flips must be true or false, not {v!r}"
    if name == "storage_dtype" and v != STORAGE_DTYPE:
        return f"storage_dtype must be {STORAGE_DTYPE!r}, not {v!r}"
    if name == "codec" and v != CODEC:
        return f"codec must be {CODEC!r}, not {v!r}"
    if name in ("vae", "source_fingerprint", "tool_version") and not isinstance(v, str):
        return f"{name} must be a string, not {v!r}"
    if name == "extra" and not isinstance(v, dict):
        return f"extra must be a JSON object, not {v!r}"
    if name in ("channel_mean", "channel_std"):
        ok = isinstance(v, list) and all(_is_number(x) for x in v) and (channels is None or len(v) == channels)
        if not ok:
            return f"{name} must be a list of {channels or 'C'} finite numbers (one per channel), not {v!r}"
        if name == "channel_std" and any(x < 0 for x in v):
            return f"channel_std must not be negative, not {v!r}"
    return None


def check_sample(key: str, array: np.ndarray, spec: LatentSpec) -> None:
    """Refuse a sample the format cannot hold faithfully: wrong shape, NaN/inf, a negative std."""
    if tuple(array.shape) != spec.sample_shape:
        raise ValueError(f"sample {key}: shape {tuple(array.shape)} != expected {spec.sample_shape}")
    with np.errstate(over="ignore"):
        stored = np.asarray(array, dtype=spec.storage_dtype)  # what would be written (overflow -> inf)
    if not np.isfinite(stored).all():
        raise ValueError(f"sample {key}: contains NaN or inf (after conversion to {spec.storage_dtype})")
    if spec.stored == STORED_POSTERIOR and (stored[:, 1] < 0).any():
        raise ValueError(f"sample {key}: negative posterior std (minimum {float(stored[:, 1].min())})")


# ---- sample encoding ----------------------------------------------------------------------------


def encode_sample(key: str, array: np.ndarray, spec: LatentSpec, compressor) -> tuple[bytes, int]:
    """(F, K, C, H, W) array -> (member bytes, flip_offset). ``compressor``: zstd.ZstdCompressor."""
    check_sample(key, array, spec)
    array = np.ascontiguousarray(array, dtype=spec.storage_dtype)
    header = spec.npy_header
    frames = [compressor.compress(header + array[f].tobytes()) for f in range(spec.num_flips)]
    return b"".join(frames), (len(frames[0]) if spec.flips else 0)


def decode_frame(frame: bytes, spec: LatentSpec, decompressor) -> np.ndarray:
    """One zstd frame -> (K, C, H, W) array in the storage dtype. Raises ValueError if bad."""
    raw = decompressor.decompress(frame)  # zstd checks the frame's content checksum
    header = spec.npy_header
    if len(raw) != spec.frame_bytes or not raw.startswith(header):
        raise ValueError(f"frame is not a {spec.storage_dtype} array of shape {spec.frame_shape}")
    return np.frombuffer(raw, dtype=spec.storage_dtype, offset=len(header)).reshape(spec.frame_shape)


def flip_frame(member: bytes, flip: int, flip_offset: int) -> bytes:
    """The compressed frame of one flip within a .latents.zst member."""
    if flip == 0:
        return member[:flip_offset] if flip_offset else member
    return member[flip_offset:]


def label_bytes(label: int) -> bytes:
    return str(int(label)).encode()


# ---- tar shards -----------------------------------------------------------------------------------


class TarMember(NamedTuple):
    name: str
    offset: int  # where its data starts in the archive
    size: int


def tar_header(name: str, size: int) -> bytes:
    """The fixed ustar header of a member: mtime 0, mode 0644, uid/gid 0, no user names."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def read_tar(data: bytes) -> list[TarMember]:
    """The regular-file members of a tar archive, in order. Raises ValueError if it is not one.

    Plain ustar archives (what our writers produce) are walked directly, with every header's
    checksum checked at once; anything else - other member types, pax or GNU headers, a bad
    checksum, a truncated archive - goes to `tarfile`, which gives the same members or the error."""
    members = _plain_ustar(data)
    if members is not None:
        return members
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            return [TarMember(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
    except tarfile.TarError as err:
        raise ValueError(f"not a readable tar ({err})") from None


_USTAR_MAGIC = b"ustar\x0000"


def _plain_ustar(data: bytes) -> list[TarMember] | None:
    """The members of a plain ustar archive of regular files, or None if ``data`` is not one."""
    members, positions, checksums, pos = [], [], [], 0
    while True:
        if pos + TAR_BLOCK > len(data):
            return None  # no end-of-archive block
        header = data[pos : pos + TAR_BLOCK]
        if header[0] == 0:
            if header.count(0) != TAR_BLOCK:
                return None
            break
        if header[257:265] != _USTAR_MAGIC or header[156:157] not in (b"0", b"\0") or header[345] != 0:
            return None  # another member type, or a name split into prefix/name
        try:
            size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
            checksums.append(int(header[148:156].rstrip(b"\0 "), 8))
            name = header[:100].split(b"\0", 1)[0].decode()
        except ValueError:  # also UnicodeDecodeError
            return None
        if name.endswith("/") or pos + TAR_BLOCK + size > len(data):
            return None
        positions.append(pos)
        members.append(TarMember(name, pos + TAR_BLOCK, size))
        pos += TAR_BLOCK + size + (-size % TAR_BLOCK)
    if members:
        blocks = np.frombuffer(data, np.uint8)[np.array(positions)[:, None] + np.arange(TAR_BLOCK)]  # (members, 512)
        sums = blocks.sum(axis=1, dtype=np.int64) - blocks[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * ord(" ")
        if not np.array_equal(sums, checksums):
            return None
    return members


# ---- per-sample randomness ----------------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 step on uint64 arrays (wrapping): add the golden gamma, then the finaliser."""
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def sample_seeds(seed: int, epoch: int, key_hashes: np.ndarray) -> np.ndarray:
    """64-bit per-sample seeds: splitmix64(splitmix64(splitmix64(seed) ^ epoch) ^ key_hash)."""
    base = splitmix64(splitmix64(np.array([seed], dtype=np.uint64)) ^ np.uint64(epoch))
    return splitmix64(base ^ key_hashes.astype(np.uint64))


def sample_flips(seeds: np.ndarray) -> np.ndarray:
    """Flip 1 (the mirror) where the seed's top bit is set."""
    return (seeds >> np.uint64(63)).astype(bool)


def noise_seeds(seeds: np.ndarray) -> list[int]:
    """torch.Generator seeds for eps: the low 63 bits of each sample seed."""
    return (seeds & np.uint64(2**63 - 1)).tolist()
