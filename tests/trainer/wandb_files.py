"""Read what wandb wrote offline: the records of ``run-<id>.wandb`` files.

wandb 0.31 has no Python reader for its transaction log any more (its core is a Go binary), so
this is one: the file is a 7-byte header (``:W&B``, magic 0xBEE1, version 0) followed by a
LevelDB-style log of 32 KiB blocks, each record a 7-byte header (masked CRC32, little-endian
length, type: 1 full, 2 first, 3 middle, 4 last) and its bytes; a record is a
``wandb_internal_pb2.Record`` protobuf.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

HEADER = b":W&B\xe1\xbe\x00"
BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[: len(HEADER)] == HEADER, f"{path}: not a wandb transaction log"
    pos, out, pending = len(HEADER), [], b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # zero padding
            pos += left
            continue
        body = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            pending = body
        elif kind == FIRST:
            pending = body
            continue
        elif kind == MIDDLE:
            pending += body
            continue
        else:
            pending += body
        record = Record()
        record.ParseFromString(pending)
        out.append(record)
    return out


def offline_runs(run_dir: Path) -> list[Path]:
    """The ``run-<id>.wandb`` files under ``run_dir/wandb``, oldest first."""
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def run_id(path: Path) -> str:
    return next(r.run.run_id for r in records(path) if r.WhichOneof("record_type") == "run")


def history(path: Path) -> list[dict]:
    """Every history row of the file: {key: value} with ``_step``."""
    rows = []
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item})
    return rows


def config_keys(path: Path) -> set[str]:
    """Top-level config keys sent in the file (wandb's own ``_wandb`` excluded)."""
    keys = set()
    for r in records(path):
        if r.WhichOneof("record_type") == "run":
            keys |= {item.key for item in r.run.config.update}
        elif r.WhichOneof("record_type") == "config":
            keys |= {item.key for item in r.config.update}
    return keys - {"_wandb"}
