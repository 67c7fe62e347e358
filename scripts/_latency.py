"""A local S3 server with added per-request latency, for the benchmark scripts.

``LatencyS3(0.02)`` starts moto's S3 server on 127.0.0.1 and a small threaded
proxy in front of it that waits ``latency`` seconds before forwarding each
request, like a remote object store 20 ms away. Concurrent requests wait in
parallel, as they would over a real network. ``options`` are the fsspec
storage options that reach it; ``requests`` counts what went through.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1"}


class _Proxy(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    upstream: tuple[str, int]
    latency: float
    counter: list[int]

    def _forward(self) -> None:
        time.sleep(self.latency)
        self.counter[0] += 1
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        conn.request(self.command, self.path, body=body or None, headers=dict(self.headers))
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for key, value in resp.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    def log_message(self, *args) -> None:  # keep benchmark output to one JSON line
        pass


class LatencyS3:
    """Context manager: moto S3 server + latency proxy; yields itself."""

    def __init__(self, latency: float) -> None:
        self.latency = latency
        self._counter = [0]

    def __enter__(self) -> "LatencyS3":
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        os.environ.update(FAKE_CREDENTIALS)
        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
        with contextlib.redirect_stdout(sys.stderr):  # moto announces itself on stdout
            self._moto.start()
        host, port = self._moto.get_host_and_port()
        handler = type("Proxy", (_Proxy,), {"upstream": (host, port), "latency": self.latency,
                                             "counter": self._counter})
        self._proxy = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._proxy.daemon_threads = True
        threading.Thread(target=self._proxy.serve_forever, daemon=True).start()
        self.direct_options = {"client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
        self.options = {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{self._proxy.server_address[1]}"}}
        return self

    @property
    def requests(self) -> int:
        return self._counter[0]

    def __exit__(self, *exc) -> None:
        self._proxy.shutdown()
        self._moto.stop()


def s3_upload_folder(s3: LatencyS3, folder: str, bucket: str) -> None:
    """Copy a local folder into a new bucket (directly, without the added latency)."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3.direct_options)
    fs.mkdir(bucket)
    fs.put(folder.rstrip("/") + "/", f"{bucket}/", recursive=True)
    fs.invalidate_cache()
