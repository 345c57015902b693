"""Storage through fsspec URLs: local paths, file://, s3://, gs://, memory://.

* `Root`: a dataset root URL with its filesystem; joins relative names.
* `retry`: bounded retries with exponential backoff on *transient* errors only (timeouts,
  connection resets, throttling, HTTP 5xx); anything else surfaces at once. The final error
  names what was being done and the class of the last error.
* `Root.publish_bytes`: atomic publication, right for each backend:

  - local disks: write ``<name>.tmp-<random>``, fsync, ``os.replace`` to the final name, fsync
    the directory. A writer killed in between leaves only a temporary, which the next writer of
    that name sweeps (`Root.sweep_temporaries`).
  - object stores (and memory://): one write to the final key - a single PUT, or a multipart
    upload whose completion comes last - which is atomic on S3 and GCS. Nothing is copied or
    deleted. If a transient error hides whether the write landed (a lost response), the retry
    first looks: a final object with the expected size and sha256 counts as success, so the
    bytes are not sent twice and no false failure is reported. A writer killed during a
    multipart upload leaves it incomplete (invisible, but its parts are billed):
    `Root.abort_uploads` aborts those under a root (`sit encode` does at its start).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import glob
import hashlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)
T = TypeVar("T")

TEMP_MARK = ".tmp-"  # temporary names: <final name>.tmp-<random>
CLIENT_MODULES = ("botocore", "aiobotocore", "s3fs", "gcsfs", "google")  # their errors become StorageError
# S3/GCS error codes that mean "slow down" or "try again"; every HTTP 5xx and 429 also counts
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
    }
)
TRANSIENT_ERRNOS = frozenset(
    {errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.EPIPE, errno.EAGAIN}
)
# class names of transport failures raised by aiohttp / botocore / urllib3 / http.client
TRANSIENT_CLASS_NAMES = frozenset(
    {
        "ServerDisconnectedError",
        "ClientConnectionError",
        "ClientOSError",
        "ClientPayloadError",
        "ServerTimeoutError",
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "HTTPClientError",
        "ResponseParserError",
        "IncompleteRead",
        "ProtocolError",
        "FSTimeoutError",
    }
)


class StorageError(OSError):
    """A storage operation failed (after retries, or at once if retrying cannot help); the
    message says what, where, and the class of the underlying error."""


def _http_status(err: BaseException) -> tuple[int | None, str | None]:
    """(HTTP status, error code) of a botocore ClientError or a gcsfs HttpError, else (None, None)."""
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status, response.get("Error", {}).get("Code")
    code = getattr(err, "code", None)  # gcsfs.retry.HttpError
    return (code, None) if isinstance(code, int) else (None, None)


GCSFS_MODULES = ("gcsfs", "requests", "google")  # gcsfs raises its own, requests' and google-auth's errors


def _gcsfs_transient(err: BaseException) -> bool | None:
    """gcsfs's own verdict on an error it raises (`gcsfs.retry.is_retriable`: HTTP 5xx, 408, 429,
    connection and timeout errors of requests, checksum mismatches), None for other errors.

    Credential failures are not transient here (gcsfs retries a 401 and a failed token refresh
    in case the token just expired; after its own retries, ours cannot help)."""
    if type(err).__module__.split(".")[0] not in GCSFS_MODULES:
        return None
    try:
        from gcsfs.retry import HttpError, is_retriable
    except ImportError:
        return None
    if type(err).__name__ == "RefreshError" or (isinstance(err, HttpError) and err.code == 401):
        return False
    return bool(is_retriable(err)) or None


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__  # explicit causes only: an error raised while handling another is itself


def is_transient(err: BaseException) -> bool:
    """Whether retrying ``err`` can help: timeouts, connection failures, throttling, HTTP 5xx/429.

    Looks through the exception's causes (s3fs turns a ClientError into an OSError caused by it).
    Missing files, permissions, bad credentials, 4xx answers and programming errors are not."""
    for e in _chain(err):
        if _gcsfs_transient(e):
            return True
        status, code = _http_status(e)
        if status is not None or code is not None:
            return (status is not None and (status >= 500 or status == 429)) or code in TRANSIENT_CODES
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return False
        if isinstance(e, (TimeoutError, ConnectionError)) or type(e).__name__ in TRANSIENT_CLASS_NAMES:
            return True
        if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS:
            return True
    return False


def describe(err: BaseException) -> str:
    """``ClassName: message`` of an error, for one-line reports."""
    return f"{type(err).__name__}: {err}"


def retry(fn: Callable[[], T], what: str, attempts: int = 5, base_delay: float = 0.2, max_delay: float = 10.0) -> T:
    """Call ``fn``; retry transient errors (see `is_transient`) with exponential backoff.

    Other errors surface at once: missing files and permissions as themselves (callers handle
    them), errors of the storage client (e.g. botocore's NoCredentialsError) as a one-line
    `StorageError`, anything else (a bug) unchanged. After ``attempts`` transient failures a
    `StorageError` naming ``what`` and the last error's class is raised from it.
    """
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as err:
            if not is_transient(err):
                _surface(err, what)
            if attempt == attempts:
                raise StorageError(f"{what}: failed after {attempts} attempts: {describe(err)}") from err
            delay = min(max_delay, base_delay * 2 ** (attempt - 1))
            why = describe(err)
            log.warning("%s: attempt %d/%d failed (%s); retrying in %.1fs", what, attempt, attempts, why, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _url_to_fs(url: str, storage_options: dict) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(url, **storage_options)
    except ImportError as err:
        raise StorageError(f"{url}: the filesystem for this URL is not installed ({err})") from None
    except ValueError as err:
        if "Protocol not known" in str(err):
            known = ", ".join(p for p in ("file", "s3", "gs", "memory") if p in fsspec.available_protocols())
            protocol = url.split("://")[0]
            raise StorageError(f"{url}: unknown storage protocol {protocol!r} (use a path or {known})") from None
        raise
    except Exception as err:  # e.g. gcsfs with token="google_default" and no credentials
        if type(err).__module__.split(".")[0] in CLIENT_MODULES:
            raise StorageError(f"{url}: cannot connect to the store: {describe(err)}") from err
        raise


class Root:
    """A dataset root: a URL and the fsspec filesystem that serves it."""

    def __init__(self, url: str, storage_options: dict | None = None, attempts: int = 5):
        self.url = url.rstrip("/")
        self.attempts = attempts  # tries per operation on transient errors
        self.storage_options = storage_options or {}
        self._fs, self.path = _url_to_fs(self.url, self.storage_options)
        self.path = self.path.rstrip("/")
        self._pid = os.getpid()

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The filesystem, created anew in each process (s3fs/gcsfs clients are not fork-safe)."""
        if self._pid != os.getpid():
            self._fs, _ = _url_to_fs(self.url, self.storage_options)
            self._pid = os.getpid()
        return self._fs

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

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
        """Atomically write ``data`` under ``name`` (see the module docstring for how, per backend)."""
        if self.is_local:
            self._publish_local(name, lambda f: f.write(data))
            return
        self._publish_remote(name, lambda: self.fs.pipe_file(self.full(name), data), len(data), lambda: sha256(data))

    def publish_file(self, name: str, local_path: str) -> None:
        """Atomically publish the local file ``local_path`` under ``name``, streamed (never whole
        in memory): like `publish_bytes`, with one upload (multipart when large) to object stores."""
        if self.is_local:
            with open(local_path, "rb") as src:
                self._publish_local(name, lambda f: shutil.copyfileobj(src, f, 1 << 20))
            return
        put = lambda: self.fs.put_file(local_path, self.full(name))  # noqa: E731
        self._publish_remote(name, put, os.path.getsize(local_path), lambda: _file_sha256(local_path))

    def _publish_remote(self, name: str, put: Callable[[], None], size: int, digest: Callable[[], bytes]) -> None:
        """``put()`` with retries; a transient error after which the object landed counts as done."""
        for attempt in range(1, self.attempts + 1):
            try:
                put()
                return
            except Exception as err:
                if not is_transient(err):
                    _surface(err, f"writing {self.url_of(name)}")
                if self._landed(name, size, digest()):  # the write went through; its answer was lost
                    log.warning("writing %s: %s, but the object is complete: done", self.url_of(name), describe(err))
                    return
                if attempt == self.attempts:
                    raise StorageError(
                        f"writing {self.url_of(name)}: failed after {self.attempts} attempts: {describe(err)}"
                    ) from err
                log.warning("writing %s: attempt %d failed (%s); retrying", self.url_of(name), attempt, describe(err))
                time.sleep(min(10.0, 0.2 * 2 ** (attempt - 1)))

    def _landed(self, name: str, size: int, digest: bytes) -> bool:
        """Whether ``name`` holds exactly the bytes of size ``size`` and sha256 ``digest``."""
        try:
            self.fs.invalidate_cache()
            if self.size(name) != size:
                return False
            return hashlib.sha256(self.read_bytes(name)).digest() == digest
        except FileNotFoundError:
            return False

    def _publish_local(self, name: str, write: Callable) -> None:
        final = self.full(name)
        directory = os.path.dirname(final)
        os.makedirs(directory, exist_ok=True)
        temp = f"{final}{TEMP_MARK}{uuid.uuid4().hex[:12]}"
        try:
            with open(temp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, final)
        except BaseException:
            if os.path.exists(temp):
                os.remove(temp)
            raise
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)  # make the rename durable
        finally:
            os.close(fd)

    def sweep_temporaries(self, names: list[str]) -> list[str]:
        """Remove leftover temporaries (``<name>.tmp-*``) of final ``names`` this writer owns.

        Only local publication makes temporaries; a writer killed between writing one and
        renaming it leaves it behind. Returns the names removed."""
        if not self.is_local:
            return []
        stale = sorted(n for name in names for n in _local_temporaries(self.full(name), self.path))
        for n in stale:
            with contextlib.suppress(FileNotFoundError):  # another sweeper got there first
                os.remove(self.full(n))
        return stale

    def abort_uploads(self) -> int:
        """Abort the incomplete S3 multipart uploads under this root; returns how many.

        A writer killed during a multipart upload (`publish_file` of a large file) leaves one
        behind: invisible to listings, but its parts are stored and billed until aborted. Call it
        only while no writer of this root runs (the start of a job). Other stores: nothing to do
        (local and memory:// writes have no parts; GCS expires resumable uploads itself)."""
        if not hasattr(self.fs, "abort_mpu"):  # s3fs only
            return 0
        try:
            return self._abort_uploads()
        except PermissionError as err:  # a policy without s3:ListBucketMultipartUploads / AbortMultipartUpload
            log.warning("%s: cannot clear incomplete multipart uploads (%s); any left keep costing", self.url, err)
            return 0

    def _abort_uploads(self) -> int:
        fs = self.fs
        bucket, _, prefix = self.path.partition("/")
        prefix = f"{prefix}/" if prefix else ""
        uploads, markers = [], {}
        while True:  # paginated: at most 1000 uploads a page
            page = retry(
                functools.partial(fs.call_s3, "list_multipart_uploads", Bucket=bucket, Prefix=prefix, **markers),
                f"listing incomplete uploads under {self.url}",
                self.attempts,
            )
            uploads += [(u["Key"], u["UploadId"]) for u in page.get("Uploads", []) if u["Key"].startswith(prefix)]
            if not page.get("IsTruncated"):
                break
            markers = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}
        for key, upload in uploads:
            with contextlib.suppress(FileNotFoundError):  # completed or aborted meanwhile
                abort = functools.partial(fs.abort_mpu, bucket, key, upload)
                retry(abort, f"aborting the upload to s3://{bucket}/{key}", self.attempts)
        if uploads:
            log.warning("%s: aborted %d incomplete multipart upload(s) left by a killed writer", self.url, len(uploads))
        return len(uploads)


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _file_sha256(path: str) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.digest()


def _local_temporaries(final: str, root: str) -> list[str]:
    return [p[len(root) + 1 :] for p in glob.glob(glob.escape(final) + TEMP_MARK + "*")]


def _surface(err: Exception, what: str) -> None:
    """Raise a non-transient error: storage-client errors as a one-line `StorageError`, others as is."""
    if type(err).__module__.split(".")[0] in CLIENT_MODULES:
        raise StorageError(f"{what}: {describe(err)}") from err
    if type(err) is OSError:  # a bare OSError names no object (gcsfs answers a 403 with "Forbidden: <upload URL>")
        raise StorageError(f"{what}: {describe(err)}") from err
    raise err
