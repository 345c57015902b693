"""The consolidated EMA export: one safetensors file with the weights and the model config.

Written by the trainer on one process (from the sharded EMA); read by `sit sample` and anything
else that wants a trained model without torch.distributed. The file's safetensors metadata holds

    format        "sit-export"
    format_version "1"
    model_config  JSON of `trainer.model.SiTConfig` (every field)
    extra         JSON object (provenance: step, images seen, dataset card fields, ...)

and its tensors are the model's state dict (float32, the released parameter names).
"""

from __future__ import annotations

import dataclasses
import json

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from trainer.model import SiT, SiTConfig

EXPORT_FORMAT = "sit-export"
EXPORT_VERSION = "1"


class ExportError(ValueError):
    """A file is not a readable SiT export; the message names the file and what is wrong."""


def save_export(url: str, state_dict: dict[str, torch.Tensor], config: SiTConfig, extra: dict | None = None) -> None:
    """Write an export to any fsspec URL, atomically on local disks (temporary name, then rename)."""
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    metadata = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "model_config": json.dumps(dataclasses.asdict(config)),
        "extra": json.dumps(extra or {}),
    }
    data = save_safetensors_bytes(tensors, metadata=metadata)
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(fs._parent(path), exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.tmp-export"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    else:  # one PUT is atomic on object stores
        fs.pipe_file(path, data)


def looks_like_safetensors(url: str, data: bytes) -> bool:
    """Whether ``data`` is meant as safetensors: its name says so, or its header starts with ``{``.

    (8 bytes of header length, then the JSON header; a torch zip starts ``PK\\x03\\x04`` with a zero there.) A
    damaged safetensors file is then reported as one, never handed to torch.load.
    """
    return url.endswith(".safetensors") or (data[8:9] == b"{" and not data.startswith(b"PK\x03\x04"))


def safetensors_header(url: str, data: bytes) -> dict:
    """The JSON header of a safetensors file, checked against the file's length; `ExportError`
    naming the file and the damage (too short, truncated, a damaged header) otherwise."""
    if len(data) < 8:
        raise ExportError(f"{url}: not a safetensors file: {len(data)} bytes, shorter than its 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ExportError(
            f"{url}: truncated or damaged safetensors file: its header length is {n:,} bytes, "
            f"the file has {len(data) - 8:,} after it"
        )
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, UnicodeDecodeError) as err:
        raise ExportError(f"{url}: damaged safetensors header (not JSON: {err})") from None
    if not isinstance(header, dict):
        raise ExportError(f"{url}: damaged safetensors header (a JSON {type(header).__name__}, not an object)")
    ends = [t.get("data_offsets", [0, 0])[1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)]
    if ends and max(ends) > len(data) - 8 - n:
        raise ExportError(
            f"{url}: truncated safetensors file: its tensors end at byte {max(ends):,} of the data, "
            f"the file holds {len(data) - 8 - n:,}"
        )
    return header


def read_export(url: str) -> tuple[SiTConfig, dict[str, torch.Tensor], dict]:
    """(config, state dict, extra) of an export; `ExportError` naming the file if it is not one."""
    with fsspec.open(url, "rb") as f:
        data = f.read()
    metadata = safetensors_header(url, data).get("__metadata__") or {}
    if metadata.get("format") != EXPORT_FORMAT:
        found = metadata.get("format")
        raise ExportError(f"{url}: not a SiT export (metadata format {found!r}, want {EXPORT_FORMAT!r})")
    if metadata.get("format_version") != EXPORT_VERSION:
        found = metadata.get("format_version")
        raise ExportError(f"{url}: export format version {found!r}; this code reads {EXPORT_VERSION}")
    fields = {f.name for f in dataclasses.fields(SiTConfig)}
    raw = json.loads(metadata["model_config"])
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ExportError(f"{url}: unknown model_config fields {unknown}; valid: {sorted(fields)}")
    try:
        state = load_safetensors_bytes(data)
    except Exception as err:  # safetensors' own SafetensorError: a damage the header check did not see
        raise ExportError(f"{url}: damaged safetensors file ({' '.join(str(err).split())})") from None
    return SiTConfig(**raw), state, json.loads(metadata.get("extra", "{}"))


def load_export(url: str) -> SiT:
    """The model of an export, on CPU in eval mode."""
    config, state, _ = read_export(url)
    model = SiT(config)
    model.load_state_dict(state, strict=True)
    return model.eval()
