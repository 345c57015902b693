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
never loaded and the next save of that step replaces it). Loading checks every file's size
and sha256 against the marker first; a damaged checkpoint is named and never loaded. Automatic
resume then falls back to the previous complete checkpoint (with a warning naming the file);
resuming from an explicitly named folder raises `CheckpointError`.

Optional asynchronous save: the state is staged to CPU memory and uploaded by a background
thread while training goes on; its marker is written (after hashing) at the next save or at
the end, so an upload cut short never counts as a checkpoint.

Retention: after each save, keep the newest ``keep_last`` complete checkpoints plus every one
whose step is a multiple of ``keep_every``; older folders (and incomplete ones older than the
newest complete one) are deleted.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from concurrent.futures import Future

import fsspec
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

from latents.storage import retry

MARKER = "COMPLETE.json"
MARKER_VERSION = 1
STEP_RE = re.compile(r"^step-(\d{9})$")

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or damaged; the message names the folder or file."""


def step_folder(url: str, step: int) -> str:
    return f"{url.rstrip('/')}/step-{step:09d}"


def _rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def _sha256(fs, path: str) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _broadcast(value):
    """rank 0's value on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class CheckpointManager:
    """Saves and finds checkpoints under one URL; every method is collective (all ranks call it)."""

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
        self._pending: tuple[int, str, dict, Future] | None = None

    def _path(self, folder_url: str) -> str:
        return fsspec.core.url_to_fs(folder_url, **self.storage_options)[1]

    # ---- saving -------------------------------------------------------------------------------

    def save(self, step: int, sharded: dict, local: dict, meta: dict | None = None, blocking: bool = True) -> str:
        """Write the step's folder: DCP of ``sharded``, this rank's ``local``, then the marker.

        With ``async_save`` and ``blocking=False`` the sharded state is copied to CPU memory and
        uploaded in a background thread; its marker is written by the next `save` or `finish`.
        """
        self.finish()
        folder = step_folder(self.url, step)
        path = self._path(folder)
        if self.rank == 0 and self.fs.exists(path):  # a torn earlier attempt at this step
            self.fs.rm(path, recursive=True)
        self._barrier()
        buf = io.BytesIO()
        torch.save(local, buf)
        self.fs.makedirs(path, exist_ok=True)
        rank_file = f"{path}/{_rank_file(self.rank)}"
        retry(lambda: self.fs.pipe_file(rank_file, buf.getvalue()), f"writing {folder}/{_rank_file(self.rank)}")
        writer = FsspecWriter(folder, sync_files=False, **self.storage_options)
        if self.async_save and not blocking:
            future = dcp.async_save(sharded, storage_writer=writer, process_group=self.async_group)
            self._pending = (step, folder, meta or {}, future)
            return folder
        dcp.save(sharded, storage_writer=writer)
        self._complete(step, folder, meta or {})
        return folder

    def finish(self) -> None:
        """Wait for a pending asynchronous save and write its marker (collective)."""
        if self._pending is not None:
            step, folder, meta, future = self._pending
            self._pending = None
            future.result()
            self._complete(step, folder, meta)

    def _complete(self, step: int, folder: str, meta: dict) -> None:
        """Hash every file (each rank its own), then rank 0 writes the marker and applies retention."""
        path = self._path(folder)
        self._barrier()
        self.fs.invalidate_cache(path)
        names = [_name(p) for p in self.fs.ls(path, detail=False)]
        mine = [n for n in names if n.startswith(f"__{self.rank}_") or n == _rank_file(self.rank)]
        if self.rank == 0:
            mine += [n for n in names if n == ".metadata"]
        sums = {n: _sha256(self.fs, f"{path}/{n}") for n in mine}
        gathered = [None] * self.world_size if self.world_size > 1 else [sums]
        if self.world_size > 1:
            dist.all_gather_object(gathered, sums)
        if self.rank == 0:
            files = {n: {"size": s, "sha256": h} for part in gathered for n, (s, h) in sorted(part.items())}
            marker = {
                "version": MARKER_VERSION,
                "step": step,
                "world_size": self.world_size,
                "files": files,
                "meta": meta,
            }
            data = json.dumps(marker, indent=1, sort_keys=True).encode()
            retry(lambda: self.fs.pipe_file(f"{path}/{MARKER}", data), f"writing {folder}/{MARKER}")
        self._barrier()
        if self.rank == 0:
            self._retain()
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

    def verify(self, folder: str) -> dict:
        """The marker of ``folder`` after checking every file's size and sha256; `CheckpointError` naming a
        missing marker or a missing, truncated or damaged file."""
        path = self._path(folder)
        try:
            marker = json.loads(self.fs.cat_file(f"{path}/{MARKER}"))
        except FileNotFoundError:
            raise CheckpointError(f"{folder}: no {MARKER}: an incomplete checkpoint, never loaded") from None
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{folder}/{MARKER}: damaged marker ({err})") from None
        for name, want in marker["files"].items():
            url = f"{folder}/{name}"
            try:
                size, sha = _sha256(self.fs, f"{path}/{name}")
            except FileNotFoundError:
                raise CheckpointError(f"{url}: missing (listed in {MARKER})") from None
            if size != want["size"]:
                raise CheckpointError(f"{url}: {size} bytes, the marker says {want['size']} (truncated?)")
            if sha != want["sha256"]:
                raise CheckpointError(
                    f"{url}: sha256 {sha[:12]}... does not match the marker's {want['sha256'][:12]}..."
                )
        return marker

    def find_resume(self, resume: str = "auto") -> str | None:
        """The folder to resume from (same answer on every rank): "none" -> None; "auto" -> the newest
        complete checkpoint that verifies (damaged ones are skipped with a warning), None if there is
        none; anything else is a step folder URL that must verify."""
        if resume == "none":
            return None
        result = None
        if self.rank == 0:
            if resume != "auto":
                try:
                    self.verify(resume)
                    result = ("ok", resume.rstrip("/"))
                except CheckpointError as err:
                    result = ("error", str(err))
            else:
                for step in reversed(self.complete_steps()):
                    folder = step_folder(self.url, step)
                    try:
                        self.verify(folder)
                    except CheckpointError as err:
                        log.warning("skipping damaged checkpoint: %s", err)
                        continue
                    result = ("ok", folder)
                    break
        result = _broadcast(result)
        if result is None:
            return None
        if result[0] == "error":
            raise CheckpointError(result[1])
        return result[1]

    # ---- loading ------------------------------------------------------------------------------

    def load(self, folder: str, sharded: dict) -> dict:
        """Load ``sharded`` in place from ``folder`` (DCP) and return this rank's local state."""
        marker = json.loads(self.fs.cat_file(f"{self._path(folder)}/{MARKER}"))
        if marker["world_size"] != self.world_size:
            raise CheckpointError(
                f"{folder}: saved by {marker['world_size']} ranks, resuming with {self.world_size}: exact resume "
                "(data position and RNG streams per rank) needs the same world size"
            )
        dcp.load(sharded, storage_reader=FsspecReader(folder, **self.storage_options))
        data = self.fs.cat_file(f"{self._path(folder)}/{_rank_file(self.rank)}")
        return torch.load(io.BytesIO(data), weights_only=True)
