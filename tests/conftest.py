"""Shared fixtures: real servers on 127.0.0.1 (S3 via moto, HTTP with byte ranges) and store URLs.

- ``s3_server`` (session): a moto S3 server with fake credentials in the
  environment and an empty bucket; yields an :class:`S3Server` with
  ``storage_options`` for fsspec/s3fs and ``url(name)`` for a fresh URL.
- ``http_server`` (session): serves ``http_server.root`` read-only, with
  ``Range`` requests; ``http_server.url(name)`` is the URL of ``root/name``;
  ``http_server.requests`` logs ``(method, path, range)``.
- ``store_url``: parametrised over memory / local / s3, a fresh
  ``(url, storage_options)`` pair for one test.
"""

from __future__ import annotations

import io
import os
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from deepstrf.testing.s3 import LocalS3

S3_BUCKET = "deepstrf-test"
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing", "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class S3Server:
    endpoint_url: str
    bucket: str
    storage_options: dict = field(default_factory=dict)
    sim: LocalS3 | None = None

    def url(self, name: str | None = None) -> str:
        return f"s3://{self.bucket}/{name or uuid.uuid4().hex}"


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 with one bucket; fake credentials set for the session.

    ``s3_server.sim`` is the :class:`LocalS3` behind it, for tests that add latency or faults.
    """
    with pytest.MonkeyPatch.context() as mp:
        for key, value in FAKE_CREDENTIALS.items():
            mp.setenv(key, value)
        with LocalS3() as sim:
            sim.make_bucket(S3_BUCKET)
            yield S3Server(sim.endpoint_url, S3_BUCKET, {"client_kwargs": {"endpoint_url": sim.endpoint_url}}, sim)


class _RangeHandler(SimpleHTTPRequestHandler):
    """Static files with single ``Range: bytes=a-b`` / ``a-`` / ``-n`` support."""

    log: list | None = None

    def log_message(self, *args) -> None:
        pass

    def send_head(self):
        if self.log is not None:
            self.log.append((self.command, self.path, self.headers.get("Range")))
        spec = self.headers.get("Range")
        if not spec:
            return super().send_head()
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404, "File not found")
            return None
        size = os.path.getsize(path)
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", spec.strip())
        if not m or (not m.group(1) and not m.group(2)):
            self.send_error(400, "Bad Range")
            return None
        if m.group(1):
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        else:
            start, end = max(0, size - int(m.group(2))), size - 1
        if start >= size or end < start:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.end_headers()
            return None
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)


@dataclass
class HTTPServer:
    root: Path
    base_url: str
    requests: list = field(default_factory=list)

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"


def _serve(root: Path, handler: type) -> Iterator[HTTPServer]:
    log: list = []
    handler = type("Handler", (handler,), {"log": log, "log_message": lambda self, *args: None})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield HTTPServer(root, f"http://127.0.0.1:{server.server_address[1]}", log)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def http_server(tmp_path_factory):
    """A threaded read-only HTTP server on 127.0.0.1 serving ``root`` with byte ranges."""
    yield from _serve(tmp_path_factory.mktemp("http-root"), _RangeHandler)


@pytest.fixture(scope="session")
def http_server_without_ranges(tmp_path_factory):
    """One that answers every request with the whole file (as ``python -m http.server`` does)."""
    yield from _serve(tmp_path_factory.mktemp("http-root-plain"), SimpleHTTPRequestHandler)


@pytest.fixture(params=["memory", "local", "s3"])
def store_url(request, tmp_path):
    """A fresh ``(url, storage_options)`` on memory://, a local folder, or the moto S3 server."""
    if request.param == "memory":
        url = f"memory://deepstrf-tests/{uuid.uuid4().hex}"
        yield url, None
        import fsspec

        fs = fsspec.filesystem("memory")
        if fs.exists(url):
            fs.rm(url, recursive=True)
    elif request.param == "local":
        yield str(tmp_path / "store.zarr"), None
    else:
        server = request.getfixturevalue("s3_server")
        yield server.url(), server.storage_options
