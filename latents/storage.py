"""Storage through fsspec URLs: local paths, file://, s3://, gs://, memory://.

* `Root`: a dataset root URL with its filesystem; joins relative names.
* `retry`: bounded retries with exponential backoff on transient errors; the final error names
  what was being done.
* `Root.publish_bytes`: atomic publication - write under a temporary name, then
  move to the final name, so nothing half-written ever carries a final name.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

import fsspec

log = logging.getLogger(__name__)
T = TypeVar("T")

TEMP_MARK = ".tmp-"  # temporary names: <final name>.tmp-<random>
# Errors that are never transient: retrying cannot help.
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError)


class StorageError(OSError):
    """A storage operation failed after its retries; the message says what and where."""


def retry(fn: Callable[[], T], what: str, attempts: int = 5, base_delay: float = 0.2, max_delay: float = 10.0) -> T:
    """Call ``fn``; on transient errors (OSError, TimeoutError, ...) retry with backoff.

    Permanent errors (missing file, permission) are raised at once. After ``attempts`` tries
    a `StorageError` naming ``what`` is raised from the last error.
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except PERMANENT_ERRORS:
            raise
        except Exception as err:  # s3fs/gcsfs/aiohttp raise a variety of transient types
            if attempt == attempts:
                raise StorageError(f"{what}: failed after {attempts} attempts: {err!r}") from err
            delay = min(max_delay, base_delay * 2 ** (attempt - 1))
            log.warning("%s: attempt %d/%d failed (%r); retrying in %.1fs", what, attempt, attempts, err, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


class Root:
    """A dataset root: a URL and the fsspec filesystem that serves it."""

    def __init__(self, url: str, storage_options: dict | None = None, attempts: int = 5):
        self.url = url.rstrip("/")
        self.attempts = attempts  # tries per operation on transient errors
        self.storage_options = storage_options or {}
        self._fs, self.path = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.path = self.path.rstrip("/")
        self._pid = os.getpid()

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The filesystem, created anew in each process (s3fs/gcsfs clients are not fork-safe)."""
        if self._pid != os.getpid():
            self._fs, _ = fsspec.core.url_to_fs(self.url, **self.storage_options)
            self._pid = os.getpid()
        return self._fs

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fs": None, "_pid": None}

    def __repr__(self) -> str:
        return f"Root({self.url!r})"

    def full(self, name: str) -> str:
        """Filesystem path of a name relative to the root."""
        return f"{self.path}/{name}"

    def url_of(self, name: str) -> str:
        """User-facing URL of a name relative to the root (for messages)."""
        return f"{self.url}/{name}"

    def exists(self, name: str) -> bool:
        return retry(lambda: self.fs.exists(self.full(name)), f"checking {self.url_of(name)}", self.attempts)

    def size(self, name: str) -> int:
        return retry(lambda: self.fs.size(self.full(name)), f"size of {self.url_of(name)}", self.attempts)

    def read_bytes(self, name: str, start: int | None = None, end: int | None = None) -> bytes:
        what = f"reading {self.url_of(name)}" + (f" bytes [{start}, {end})" if start is not None else "")
        return retry(lambda: self.fs.cat_file(self.full(name), start=start, end=end), what, self.attempts)

    def list(self, prefix: str) -> list[str]:
        """Names (relative to the root) of the files under ``prefix``; [] if there is none."""
        try:
            found = retry(lambda: self.fs.find(self.full(prefix)), f"listing {self.url_of(prefix)}", self.attempts)
        except FileNotFoundError:
            return []
        # memory:// reports paths with a leading "/" while its root path may lack it (and vice versa)
        root = self.path.lstrip("/") + "/"
        names = (f.lstrip("/") for f in found)
        return sorted(n[len(root) :] for n in names if n.startswith(root))

    def publish_bytes(self, name: str, data: bytes) -> None:
        """Atomically write ``data`` under ``name`` (temporary name, then move)."""
        temp = self.temp_name(name)
        self.makedirs_for(temp)
        retry(lambda: self.fs.pipe_file(self.full(temp), data), f"writing {self.url_of(temp)}", self.attempts)
        self.commit(temp, name)

    def temp_name(self, name: str) -> str:
        return f"{name}{TEMP_MARK}{uuid.uuid4().hex[:12]}"

    def commit(self, temp: str, name: str) -> None:
        """Move a fully written temporary file to its final name."""
        retry(lambda: self.fs.mv(self.full(temp), self.full(name)), f"publishing {self.url_of(name)}", self.attempts)

    def makedirs_for(self, name: str) -> None:
        parent = self.full(name).rsplit("/", 1)[0]
        retry(lambda: self.fs.makedirs(parent, exist_ok=True), f"creating {parent}", self.attempts)
