"""Checkpoints: one folder per step on any fsspec URL, a completion marker written last.

Layout of ``<url>/step-000001000/``:

    .metadata, __<rank>_<i>.distcp   torch.distributed.checkpoint (DCP) of the sharded state:
                                     model, EMA and optimizer (each rank writes its shards)
    rank-<rank>.pt                   this rank's small state: step, images seen, reader position,
                                     RNG states (time/noise, label dropout) - torch.save, read
                                     back with weights_only=True
    COMPLETE.json                    written last, by rank 0, after every rank has finished:
                                     step, world size, and every other file's size and sha256

A folder without COMPLETE.json is not a checkpoint (a run killed while saving leaves one; it is
never loaded and the next save of that step replaces it).

Nothing is read back to hash it, and no rank reads the whole checkpoint. Saving: every byte is
hashed on its way out (DCP's fsspec writer with hashing streams, and the rank file in memory),
so each rank knows its own files' sizes and sha256; rank 0 gathers them into the marker, after
checking that they are exactly the files in the folder. Loading: each rank reads the files it
wrote (the same world size is required) once, in order - every byte hashed, DCP's items served
from the bytes just read - plus the small ``.metadata`` and the marker, and compares size and
sha256 with the marker at the end of each file; items it needs from another rank's file (the
few replicated ones DCP saved once) are read as slices and checked by their owner. The ranks
then agree: a file that does not match is named in one line (`DamagedCheckpointError`), on every
rank. `verify` checks a folder without loading it, each rank a 1/world share of the files.

A damaged checkpoint is never used: automatic resume falls back to the previous complete one
(with a warning naming the file); resuming from an explicitly named folder raises.
(A damaged folder may have been partly read into the state before the damage showed; the
fallback loads every key again, and a run whose checkpoints are all damaged stops.)

Optional asynchronous save: the state is staged to CPU memory and uploaded by a background
thread while training goes on; its marker is written at the next save or at the end, so an
upload cut short never counts as a checkpoint.

Retention: after each save, keep the newest ``keep_last`` complete checkpoints plus every one
whose step is a multiple of ``keep_every``; older folders (and incomplete ones older than the
newest complete one) are deleted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import threading

import fsspec
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecReader, FsspecWriter
from torch.distributed.checkpoint.api import CheckpointException

from latents.storage import retry

MARKER = "COMPLETE.json"
MARKER_VERSION = 1
DCP_METADATA = ".metadata"
STEP_RE = re.compile(r"^step-(\d{9})$")
OWNER_RE = re.compile(r"^(?:__(\d+)_\d+\.distcp|rank-(\d+)\.pt)$")
CHUNK = 8 << 20

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, damaged or does not fit; the message names the folder or file."""


class DamagedCheckpointError(CheckpointError):
    """A file of a complete checkpoint is missing or does not match its marker (or the marker is unreadable)."""


def step_folder(url: str, step: int) -> str:
    return f"{url.rstrip('/')}/step-{step:09d}"


def _rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def _name(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def _owner(name: str) -> int:
    """The rank that wrote a file: ``__<r>_<i>.distcp`` and ``rank-<r>.pt`` rank r, the rest rank 0."""
    m = OWNER_RE.match(name)
    return int(m.group(1) or m.group(2)) if m else 0


def _compare(url: str, size: int, sha: str, want: dict) -> None:
    if size != want["size"]:
        raise DamagedCheckpointError(f"{url}: {size} bytes, the marker says {want['size']} (truncated?)")
    if sha != want["sha256"]:
        raise DamagedCheckpointError(
            f"{url}: sha256 {sha[:12]}... does not match the marker's {want['sha256'][:12]}..."
        )


def _broadcast(value):
    """rank 0's value on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(value) -> list:
    """Every rank's value, in rank order, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


# ---- hashing I/O: DCP's fsspec writer and reader with sha256 on the fly -------------------------------


class _HashingStream(io.RawIOBase):
    """An open binary file that hashes every byte written to it, or read from it in order.

    ``size`` is the position: bytes written or read so far. Reading: ``want`` (the marker's
    entry) names a short file as truncated the moment it ends early.
    """

    def __init__(self, raw, url: str, want: dict | None = None):
        super().__init__()
        self.raw, self.url, self.want = raw, url, want
        self.digest = hashlib.sha256()
        self.size = 0
        self.written = False

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def write(self, data) -> int:
        self.raw.write(data)
        self.written = True
        self.digest.update(data)
        n = memoryview(data).nbytes
        self.size += n
        return n

    def readinto(self, buffer) -> int:
        data = self.raw.read(len(buffer))
        buffer[: len(data)] = data
        self.digest.update(data)
        self.size += len(data)
        return len(data)

    def read_exactly(self, n: int) -> bytes:
        parts = []
        while n > 0 and (chunk := self.read(min(n, CHUNK))):
            parts.append(chunk)
            n -= len(chunk)
        if n > 0:
            want = self.want["size"] if self.want else "more"
            raise DamagedCheckpointError(f"{self.url}: {self.size} bytes, the marker says {want} (truncated?)")
        return b"".join(parts)

    def skip_to(self, offset: int) -> None:
        """Read (and hash) up to ``offset``; reading stays in order."""
        if offset < self.size:
            raise RuntimeError(f"{self.url}: read at {offset} after {self.size} (hashed reads must go in order)")
        self.read_exactly(offset - self.size)

    def drain(self) -> None:
        """Read (and hash) the rest of the file."""
        while self.read(CHUNK):
            pass

    def flush(self) -> None:
        if self.written:
            self.raw.flush()

    def close(self) -> None:
        if not self.closed:
            super().close()  # flushes
            self.raw.close()

    def check(self) -> None:
        """The whole file was read: compare size and sha256 with the marker's."""
        _compare(self.url, self.size, self.digest.hexdigest(), self.want)


class _HashingFileSystem(FileSystem):
    """DCP's fsspec file system with hashed streams: files written are recorded in ``written``
    (name -> (size, sha256)); files named in ``check`` are hashed while read and compared with
    ``expected`` (the marker's entries) when closed."""

    def __init__(self, expected: dict | None = None, check: set[str] = frozenset()):
        super().__init__()
        self.expected, self.check = expected or {}, set(check)
        self.written: dict[str, tuple[int, str]] = {}
        self.checked: set[str] = set()
        self._lock = threading.Lock()  # DCP may write from several threads

    @contextlib.contextmanager
    def create_stream(self, path, mode: str):
        url, name = os.fspath(path), _name(os.fspath(path))
        with super().create_stream(path, mode) as raw:
            if "w" in mode:
                stream = _HashingStream(raw, url)
                yield stream
                with self._lock:
                    self.written[name] = (stream.size, stream.digest.hexdigest())
            elif name in self.check:
                stream = _HashingStream(raw, url, self.expected[name])
                yield stream
                stream.drain()
                stream.check()
                self.checked.add(name)
            else:
                yield raw

    def rename(self, path, new_path) -> None:  # DCP writes .metadata under a temporary name first
        super().rename(path, new_path)
        with self._lock:
            if _name(path) in self.written:
                self.written[_name(new_path)] = self.written.pop(_name(path))


class _HashingWriter(FsspecWriter):
    """DCP's fsspec writer; ``fs.written`` holds this rank's files' sizes and sha256 afterwards."""

    def __init__(self, path: str, **storage_options):
        super().__init__(path, sync_files=False, **storage_options)
        self.fs = _HashingFileSystem()
        self.path = self.fs.init_path(path, **storage_options)


class _VerifyingReader(FsspecReader):
    """DCP's fsspec reader reading each file of ``fs.check`` once, in offset order, every byte hashed,
    and of other files only the items needed; each item is handed to DCP from the bytes just read."""

    def __init__(self, path: str, fs: _HashingFileSystem, **storage_options):
        super().__init__(path, **storage_options)
        self.fs = fs
        self.path = fs.init_path(path, **storage_options)

    def read_data(self, plan, planner):
        def where(item):
            info = self.storage_data[item.storage_index]
            return info.relative_path, info.offset

        return super().read_data(dataclasses.replace(plan, items=sorted(plan.items, key=where)), planner)

    def _slice_file(self, file, sinfo):
        """The item's bytes, read once (torch.load would read a file view's zip records twice)."""
        if not isinstance(file, _HashingStream):  # another rank's file, for a replicated item: its owner checks it
            file.seek(sinfo.offset)
            return io.BytesIO(file.read(sinfo.length))
        file.skip_to(sinfo.offset)
        return io.BytesIO(file.read_exactly(sinfo.length))


def _dcp_problem(err: CheckpointException) -> tuple[str, str]:
    """("damaged", message) if any rank found a damaged file inside DCP, else ("failed", the first error)."""
    failures = [err.failures[rank][0] for rank in sorted(err.failures)]
    for exc in failures:
        if isinstance(exc, DamagedCheckpointError):
            return "damaged", str(exc)
    return "failed", f"{type(failures[0]).__name__}: {failures[0]}"


# ---- the manager ----------------------------------------------------------------------------------


class CheckpointManager:
    """Saves and finds checkpoints under one URL; every method is collective (all ranks call it).

    The state handed to `save`, `load` and `restore` maps names to `Stateful` objects (anything with
    ``state_dict``/``load_state_dict``: model, EMA, optimizer wrappers) or tensors, as DCP takes it.
    """

    def __init__(
        self,
        url: str,
        keep_last: int = 3,
        keep_every: int = 0,
        async_save: bool = False,
        storage_options: dict | None = None,
    ):
        self.url = url.rstrip("/")
        self.keep_last, self.keep_every = keep_last, keep_every
        self.storage_options = storage_options or {}
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        # async uploads plan over a gloo group of their own, apart from the training collectives
        self.async_group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None
        self.async_save = async_save
        self._pending: tuple | None = None

    def _path(self, folder_url: str) -> str:
        return fsspec.core.url_to_fs(folder_url, **self.storage_options)[1]

    # ---- saving -------------------------------------------------------------------------------

    def save(self, step: int, state: dict, local: dict, meta: dict | None = None, blocking: bool = True) -> str:
        """Write the step's folder: DCP of ``state``, this rank's ``local``, then the marker.

        With ``async_save`` and ``blocking=False`` the state is copied to CPU memory and uploaded
        in a background thread; its marker is written by the next `save` or `finish`.
        """
        self.finish()
        folder = step_folder(self.url, step)
        path = self._path(folder)
        if self.rank == 0 and self.fs.exists(path):  # a torn earlier attempt at this step
            self.fs.rm(path, recursive=True)
        self._barrier()
        buf = io.BytesIO()
        torch.save(local, buf)
        data = buf.getvalue()
        self.fs.makedirs(path, exist_ok=True)
        name = _rank_file(self.rank)
        retry(lambda: self.fs.pipe_file(f"{path}/{name}", data), f"writing {folder}/{name}")
        local_hash = {name: (len(data), hashlib.sha256(data).hexdigest())}
        writer = _HashingWriter(folder, **self.storage_options)
        if self.async_save and not blocking:
            future = dcp.async_save(state, storage_writer=writer, process_group=self.async_group)
            self._pending = (step, folder, meta or {}, local_hash, writer, future)
            return folder
        dcp.save(state, storage_writer=writer)
        self._complete(step, folder, meta or {}, {**local_hash, **writer.fs.written})
        return folder

    def finish(self) -> None:
        """Wait for a pending asynchronous save and write its marker (collective)."""
        if self._pending is not None:
            step, folder, meta, local_hash, writer, future = self._pending
            self._pending = None
            future.result()
            self._complete(step, folder, meta, {**local_hash, **writer.fs.written})

    def _complete(self, step: int, folder: str, meta: dict, hashes: dict[str, tuple[int, str]]) -> None:
        """Gather every rank's hashes of what it wrote; rank 0 writes the marker and applies retention."""
        gathered = _gather(hashes)
        problem = None
        if self.rank == 0:
            files = {n: {"size": s, "sha256": h} for part in gathered for n, (s, h) in sorted(part.items())}
            path = self._path(folder)
            self.fs.invalidate_cache(path)
            listed = {_name(p) for p in self.fs.ls(path, detail=False)} - {MARKER}
            if listed != files.keys():
                odd = sorted(listed ^ files.keys())
                problem = f"{folder}: {', '.join(odd)}: in the folder but not written by this save, or the reverse"
            else:
                marker = {"version": MARKER_VERSION, "step": step, "world_size": self.world_size, "files": files}
                data = json.dumps({**marker, "meta": meta}, indent=1, sort_keys=True).encode()
                retry(lambda: self.fs.pipe_file(f"{path}/{MARKER}", data), f"writing {folder}/{MARKER}")
                self._retain()
        problem = _broadcast(problem)
        if problem:
            raise CheckpointError(problem)
        self._barrier()

    def _retain(self) -> None:
        complete = self.complete_steps()
        if not complete:
            return
        keep = set(complete[-self.keep_last :])
        keep |= {s for s in complete if self.keep_every and s % self.keep_every == 0}
        for step in self._all_steps():
            if step not in keep and step <= complete[-1]:
                self.fs.rm(self._path(step_folder(self.url, step)), recursive=True)

    def _barrier(self) -> None:
        if dist.is_initialized() and self.world_size > 1:
            dist.barrier()

    # ---- finding ------------------------------------------------------------------------------

    def _all_steps(self) -> list[int]:
        if not self.fs.exists(self.root):
            return []
        self.fs.invalidate_cache(self.root)
        steps = []
        for p in self.fs.ls(self.root, detail=False):
            m = STEP_RE.match(_name(p))
            if m:
                steps.append(int(m.group(1)))
        return sorted(steps)

    def complete_steps(self) -> list[int]:
        """Steps whose folder has a completion marker (not yet verified), oldest first."""
        return [s for s in self._all_steps() if self.fs.exists(f"{self._path(step_folder(self.url, s))}/{MARKER}")]

    def _marker(self, folder: str) -> dict:
        try:
            return json.loads(self.fs.cat_file(f"{self._path(folder)}/{MARKER}"))
        except FileNotFoundError:
            raise CheckpointError(f"{folder}: no {MARKER}: an incomplete checkpoint, never loaded") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DamagedCheckpointError(f"{folder}/{MARKER}: damaged marker ({err})") from None

    def _check_file(self, folder: str, name: str, want: dict) -> None:
        """Read one file through the hash and compare it with the marker's entry."""
        url = f"{folder}/{name}"
        try:
            with self.fs.open(f"{self._path(folder)}/{name}", "rb") as f:
                stream = _HashingStream(f, url, want)
                stream.drain()
        except FileNotFoundError:
            raise DamagedCheckpointError(f"{url}: missing (listed in {MARKER})") from None
        stream.check()

    def verify(self, folder: str) -> dict:
        """The marker of ``folder`` after checking every file's size and sha256, each rank a 1/world
        share (collective); `DamagedCheckpointError` naming a missing, truncated or damaged file
        (the same on every rank), `CheckpointError` for a folder without marker."""
        folder = folder.rstrip("/")
        marker = self._marker(folder)
        problem = None
        for name, want in sorted(marker["files"].items()):
            if _owner(name) % self.world_size == self.rank:
                try:
                    self._check_file(folder, name, want)
                except DamagedCheckpointError as err:
                    problem = str(err)
                    break
        problem = next((p for p in _gather(problem) if p), None)
        if problem:
            raise DamagedCheckpointError(problem)
        return marker

    # ---- loading ------------------------------------------------------------------------------

    def load(self, folder: str, state: dict) -> dict:
        """Load ``state`` in place from ``folder`` (DCP), checking every file on the way (see the module
        docstring), and return this rank's local state. `DamagedCheckpointError` names a damaged file
        on every rank; `CheckpointError` a folder that does not fit (world size, keys, shapes)."""
        folder = folder.rstrip("/")
        marker = self._marker(folder)
        if marker["world_size"] != self.world_size:
            raise CheckpointError(
                f"{folder}: saved by {marker['world_size']} ranks, resuming with {self.world_size}: exact resume "
                "(data position and RNG streams per rank) needs the same world size"
            )
        files = marker["files"]
        mine = {n for n in files if _owner(n) == self.rank and n != _rank_file(self.rank)}
        fs = _HashingFileSystem(files, mine | ({DCP_METADATA} & files.keys()))
        local, problem = None, None
        try:
            dcp.load(state, storage_reader=_VerifyingReader(folder, fs, **self.storage_options))
            for name in sorted(fs.check - fs.checked):  # own files DCP needed nothing from
                self._check_file(folder, name, files[name])
            local = self._load_local(folder, files)
        except DamagedCheckpointError as err:
            problem = ("damaged", str(err))
        except CheckpointException as err:  # DCP's collective error (a BaseException)
            problem = _dcp_problem(err)
        except Exception as err:  # named below: a damaged file if `verify` finds one, else this
            problem = ("failed", f"{type(err).__name__}: {err}")
        problems = [p for p in _gather(problem) if p]
        damaged = [message for kind, message in problems if kind == "damaged"]
        if damaged:
            raise DamagedCheckpointError(damaged[0])
        if problems:
            self.verify(folder)
            raise CheckpointError(f"{folder}: cannot be loaded: {' '.join(problems[0][1].split())}")
        return local

    def _load_local(self, folder: str, files: dict) -> dict:
        name = _rank_file(self.rank)
        url = f"{folder}/{name}"
        if name not in files:
            raise DamagedCheckpointError(f"{folder}/{MARKER}: does not list {name}")
        try:
            data = self.fs.cat_file(f"{self._path(folder)}/{name}")
        except FileNotFoundError:
            raise DamagedCheckpointError(f"{url}: missing (listed in {MARKER})") from None
        _compare(url, len(data), hashlib.sha256(data).hexdigest(), files[name])
        return torch.load(io.BytesIO(data), weights_only=True)

    def restore(self, resume: str, state: dict) -> tuple[str, dict] | None:
        """Load the checkpoint to resume from into ``state``; (its folder, this rank's local state).

        ``resume``: "none" -> None; "auto" -> the newest complete checkpoint that loads (damaged
        ones are skipped with a warning; if every one is damaged, `CheckpointError`), None if there
        is none; anything else is a step folder URL that must load.
        """
        if resume == "none":
            return None
        if resume != "auto":
            return resume.rstrip("/"), self.load(resume, state)
        damaged = []
        for step in reversed(_broadcast(self.complete_steps() if self.rank == 0 else None)):
            folder = step_folder(self.url, step)
            try:
                return folder, self.load(folder, state)
            except DamagedCheckpointError as err:
                if self.rank == 0:
                    log.warning("skipping damaged checkpoint: %s", err)
                damaged.append(str(err))
        if damaged:
            raise CheckpointError(
                f"{self.url}: every complete checkpoint is damaged (newest: {damaged[0]}); "
                "remove them or start afresh with checkpoint.resume=none"
            )
        return None
