"""The S3 clients of a process: one per set of options, shared by every store it opens.

An aiobotocore client costs a parsed service model, a TLS context (the CA bundle
loaded: ~20 ms of CPU) and a pool of connections, each opened with a round trip.
fsspec caches file-system instances per thread, and deepstrf opens a pool and its
sources from several threads, so before this module every store had its own
client: four in the process that opened a two-source pool, three more in each
DataLoader worker, every one loading the CA bundle again before its first request.

Here a process makes one ``S3FileSystem`` per distinct set of options, and every
store opened with those options reads through it (one connection pool, at most
``max_pool_connections`` connections). A forked process makes its own (a client
is bound to its process's event loop) but inherits what does not depend on one:
the aiobotocore session with its parsed models (:func:`shared_s3_session`) and
the TLS contexts (:class:`SharedTLSSession`).
"""

from __future__ import annotations

import os
import threading
from typing import Any

# s3fs reads an object without a range concurrently in parts when max_concurrency > 1, which
# first costs a HEAD request for its size: for chunk objects (tens of KB) that doubles the
# requests.
S3_READ_DEFAULTS: dict[str, Any] = {"max_concurrency": 1}
# botocore waits 60 s for a connection and 60 s between two reads of an answer, then retries: one
# stalled connection held a read for minutes. A chunk's bytes never pause that long on a live one.
# Reads also use more concurrent connections than botocore's default of 10. botocore also
# computes the CRC32 of every object it reads that was written with one (all that a recent
# botocore writes): a second checksum over bytes whose every chunk and shard index carries its
# CRC32C, checked when it is decoded (1.5 % of the CPU of a first epoch over S3, measured);
# writes keep theirs, which the server checks.
S3_CONFIG_DEFAULTS: dict[str, Any] = {"max_pool_connections": 64, "connect_timeout": 10, "read_timeout": 30,
                                      "response_checksum_validation": "when_required"}

_S3_SESSION: Any = None


def shared_s3_session() -> Any:
    """One aiobotocore session for this process and the processes it forks.

    A session parses botocore's service models once; a forked DataLoader worker
    that inherits it creates its S3 client in ~0.03 s instead of ~0.3 s (measured).
    """
    global _S3_SESSION
    if _S3_SESSION is None:
        import aiobotocore.session

        _S3_SESSION = aiobotocore.session.AioSession()
    return _S3_SESSION


def http_session_class() -> type | None:
    """:class:`SharedTLSSession` where this aiobotocore lets a config choose the HTTP session
    class (``AioConfig(http_session_cls=...)``), else None."""
    import inspect

    from aiobotocore.config import AioConfig

    if "http_session_cls" not in inspect.signature(AioConfig.__init__).parameters:
        return None
    return _shared_tls_session_class()


_TLS_CLASS: type | None = None
_TLS_CONTEXTS: dict[str, Any] = {}  # by ``verify`` setting
_TLS_LOCK = threading.Lock()


def _shared_tls_session_class() -> type:
    global _TLS_CLASS
    if _TLS_CLASS is None:
        from aiobotocore.httpsession import AIOHTTPSession

        class SharedTLSSession(AIOHTTPSession):
            """aiobotocore's HTTP session whose TLS context is built once per ``verify`` setting in
            a process (and inherited by forked workers) instead of once per client. Sessions with a
            client certificate or a proxy build their own, as aiobotocore does."""

            def _build_ssl_contexts(self, proxy_url):  # where aiobotocore has no such step: inert
                if proxy_url or getattr(self, "_cert_file", None):
                    return super()._build_ssl_contexts(proxy_url)
                key = repr(self._verify)  # True, False or a CA bundle's path
                with _TLS_LOCK:
                    if key not in _TLS_CONTEXTS:
                        _TLS_CONTEXTS[key] = super()._build_ssl_contexts(proxy_url)
                    return _TLS_CONTEXTS[key]

        SharedTLSSession.__qualname__ = SharedTLSSession.__name__  # pickled by name (module __getattr__)
        _TLS_CLASS = SharedTLSSession
    return _TLS_CLASS


def __getattr__(name: str) -> Any:
    # the class is made on first use (importing aiobotocore costs ~0.2 s where S3 is never read)
    if name == "SharedTLSSession":
        return _shared_tls_session_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _botocore_options() -> Any:
    """The options this botocore's ``Config`` takes (botocore < 1.36 has no checksum settings: it
    validates no response checksum either)."""
    from botocore.config import Config

    return Config.OPTION_DEFAULTS


def s3_options(given: dict[str, Any] | None) -> dict[str, Any]:
    """``given`` storage options with deepstrf's S3 defaults (the caller's values win)."""
    options = {**S3_READ_DEFAULTS, **(given or {})}
    known = _botocore_options()
    config = {k: v for k, v in S3_CONFIG_DEFAULTS.items() if k in known}
    if (session_class := http_session_class()) is not None:
        config["http_session_cls"] = session_class
    options["config_kwargs"] = {**config, **(options.get("config_kwargs") or {})}
    if "session" not in options and "profile" not in options:
        options["session"] = shared_s3_session()
    return options


class _ProcessFileSystems:
    """Asynchronous ``S3FileSystem`` instances of this process, by options."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_options: dict[str, Any] = {}

    def get(self, options: dict[str, Any]) -> Any:
        import s3fs
        from fsspec.utils import tokenize

        key = tokenize(options)  # objects among the options (a session) count by identity
        with self._lock:
            fs = self._by_options.get(key)
            if fs is None:
                fs = self._by_options[key] = s3fs.S3FileSystem(
                    **{**options, "asynchronous": True, "skip_instance_cache": True})
            return fs

    def after_fork(self) -> None:
        """In a forked child: the parent's clients belong to its event loop; make new ones (the TLS
        contexts stay: they belong to no loop)."""
        global _TLS_LOCK
        self._lock = threading.Lock()
        self._by_options = {}
        _TLS_LOCK = threading.Lock()


_FILESYSTEMS = _ProcessFileSystems()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_FILESYSTEMS.after_fork)


def process_s3_filesystem(options: dict[str, Any]) -> Any:
    """The asynchronous ``S3FileSystem`` this process reads through with ``options`` (made on first
    call; forked processes make their own)."""
    return _FILESYSTEMS.get(options)
