"""Run under torchrun: `sit train` whose checkpoints live on ``counting://``, a local file system that
counts the bytes each process reads, per file.

    torchrun --nproc_per_node 2 -m tests.trainer.count_reads OUT_DIR <python -m trainer.train flags>

`CountingFileSystem` is fsspec's own local file system (a subclass, registered under the protocol
"counting"), so checkpoints are written and read for real; only its file objects add up what
``read``, ``readinto`` and ``readline`` return. Each rank writes ``OUT_DIR/reads-<rank>.json``:
{local path: bytes read}.
"""

from __future__ import annotations

import collections
import json
import os
import sys
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileOpener, LocalFileSystem

PROTOCOL = "counting"
READS: collections.Counter = collections.Counter()  # path -> bytes read by this process


class _CountingFile(LocalFileOpener):
    def _count(self, data):
        READS[self.path] += len(data)
        return data

    def read(self, *args, **kwargs):
        return self._count(self.f.read(*args, **kwargs))

    def read1(self, *args, **kwargs):
        return self._count(self.f.read1(*args, **kwargs))

    def readline(self, *args, **kwargs):
        return self._count(self.f.readline(*args, **kwargs))

    def readlines(self, *args, **kwargs):
        lines = self.f.readlines(*args, **kwargs)
        READS[self.path] += sum(len(line) for line in lines)
        return lines

    def readinto(self, buffer):
        n = self.f.readinto(buffer)
        READS[self.path] += n or 0
        return n

    def readinto1(self, buffer):
        n = self.f.readinto1(buffer)
        READS[self.path] += n or 0
        return n

    def __iter__(self):
        return iter(self.readline, b"")


class CountingFileSystem(LocalFileSystem):
    protocol = (PROTOCOL,)

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        path = self._strip_protocol(path)
        if "r" in mode and "+" not in mode:
            return _CountingFile(path, mode, fs=self, **kwargs)
        return super()._open(path, mode, block_size, **kwargs)


def register() -> None:
    fsspec.register_implementation(PROTOCOL, CountingFileSystem, clobber=True)


def main(out_dir: str, *flags: str) -> int:
    register()
    from trainer.cli import train_main

    try:
        return train_main(list(flags))
    finally:
        rank = int(os.environ.get("RANK", "0"))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        Path(out_dir, f"reads-{rank}.json").write_text(json.dumps(dict(READS), indent=1))


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
