"""A local S3 server (moto) with added latency and injectable faults.

Used by the streaming tests and ``scripts/bench_stream.py`` to exercise the
remote path for real: HTTP on 127.0.0.1, s3fs as the client. Faults are
matched on the request path, e.g. ``server.fail("/values/c/", status=503,
times=3)`` answers the next three matching GETs with 503 SlowDown.
Requires ``moto[server]`` (a test dependency).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

_REASONS = {403: ("Forbidden", "AccessDenied"), 404: ("Not Found", "NoSuchKey"),
            500: ("Internal Server Error", "InternalError"), 503: ("Service Unavailable", "SlowDown")}


@dataclass
class Fault:
    """Answer requests whose path contains ``match`` with ``status``, ``times`` times (None: always);
    with ``stall_s``, answer them normally after that many seconds of silence instead."""

    match: str
    status: int
    times: int | None
    method: str = "GET"
    hits: int = 0
    stall_s: float = 0.0


class _FaultyApp:
    """WSGI middleware: latency on every request, then a matching fault or the real app."""

    def __init__(self, app: Callable, latency_s: float) -> None:
        self.app = app
        self.latency_s = latency_s
        self.faults: list[Fault] = []
        self.requests = 0
        self.bytes_sent = 0  # body bytes of answers to GET requests (Content-Length)
        self.seen: set[tuple[str, str]] = set()  # (access key id, bucket) of every signed request
        self.lock = threading.Lock()

    def _note(self, environ: dict) -> None:
        match = re.search(r"Credential=([^/,\s]+)/", environ.get("HTTP_AUTHORIZATION", ""))
        bucket = environ.get("PATH_INFO", "").lstrip("/").split("/", 1)[0]
        with self.lock:
            self.seen.add((match.group(1) if match else "", bucket))

    def _fault_for(self, method: str, path: str) -> Fault | None:
        with self.lock:
            self.requests += 1
            for f in self.faults:
                if f.method == method and f.match in path and (f.times is None or f.hits < f.times):
                    f.hits += 1
                    return f
        return None

    def _counting(self, method: str, start_response: Callable) -> Callable:
        def counted(status: str, headers: list, *exc_info: Any) -> Callable:
            if method == "GET":
                size = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
                with self.lock:
                    self.bytes_sent += size
            return start_response(status, headers, *exc_info)
        return counted

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if self.latency_s:
            time.sleep(self.latency_s)
        self._note(environ)
        fault = self._fault_for(environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""))
        if fault is not None and fault.stall_s:
            time.sleep(fault.stall_s)
            fault = None
        if fault is None:
            return self.app(environ, self._counting(environ["REQUEST_METHOD"], start_response))
        reason, code = _REASONS.get(fault.status, ("Error", "InternalError"))
        body = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                f"<Message>injected fault</Message></Error>").encode()
        start_response(f"{fault.status} {reason}", [("Content-Type", "application/xml"),
                                                    ("Content-Length", str(len(body)))])
        return [body]


class LocalS3:
    """A moto S3 server in a background thread; use as a context manager.

    ``storage_options()`` gives the fsspec options that reach it (fake
    credentials, endpoint, botocore retry settings).
    """

    def __init__(self, latency_s: float = 0.0) -> None:
        self.latency_s = latency_s
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._app: _FaultyApp | None = None

    def start(self) -> "LocalS3":
        from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
        self._app = _FaultyApp(DomainDispatcherApplication(create_backend_app), self.latency_s)
        self._server = make_server("127.0.0.1", 0, self._app, threaded=True, request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="local-s3")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._thread.join()
            self._server = None

    def __enter__(self) -> "LocalS3":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def endpoint_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def requests(self) -> int:
        """Requests served so far (faults included)."""
        return self._app.requests

    @property
    def bytes_sent(self) -> int:
        """Body bytes served to GET requests so far (what clients fetched)."""
        return self._app.bytes_sent

    @property
    def seen(self) -> set[tuple[str, str]]:
        """``(access key id, bucket)`` of every signed request served so far."""
        with self._app.lock:
            return set(self._app.seen)

    def forget_seen(self) -> None:
        with self._app.lock:
            self._app.seen.clear()

    def set_latency(self, seconds: float) -> None:
        self._app.latency_s = seconds

    def storage_options(self, botocore_attempts: int = 3, **extra: Any) -> dict:
        """fsspec/s3fs options for this server (``botocore_attempts`` = botocore's own tries)."""
        return {"key": "testing", "secret": "testing",
                "client_kwargs": {"endpoint_url": self.endpoint_url},
                "config_kwargs": {"retries": {"max_attempts": botocore_attempts, "mode": "standard"}},
                **extra}

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name``; returns ``s3://name``."""
        import s3fs

        s3fs.S3FileSystem(**self.storage_options()).mkdir(name)
        return f"s3://{name}"

    def fail(self, match: str, status: int = 503, times: int | None = 1, method: str = "GET") -> Fault:
        """Inject a fault (see :class:`Fault`); returns it so a test can read ``hits``."""
        fault = Fault(match, status, times, method)
        with self._app.lock:
            self._app.faults.append(fault)
        return fault

    def stall(self, match: str, seconds: float, times: int | None = 1, method: str = "GET") -> Fault:
        """Hold matching requests ``seconds`` before answering them (a connection gone quiet)."""
        fault = Fault(match, 200, times, method, stall_s=seconds)
        with self._app.lock:
            self._app.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._app.lock:
            self._app.faults.clear()
