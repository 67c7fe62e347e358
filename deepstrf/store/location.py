"""Where a store lives: a URL plus fsspec ``storage_options``.

A :class:`Location` turns a user URL (local path, ``file://``, ``memory://``,
``s3://``, ``http(s)://`` or any fsspec protocol) into a zarr store for
reading or writing and into an fsspec file system for the few whole-store
operations (existence, listing, removal, rename) zarr does not offer.
Credentials stay in ``storage_options`` in memory; nothing here writes them.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

from ..errors import ReadOnlyStoreError, StoreError
from .options import StorageOptions, options_for
from .options import protocol_of as _protocol
from .s3clients import process_s3_filesystem, s3_options

READ_ONLY_PROTOCOLS = ("http", "https")
ROOT_KEY = "zarr.json"


def on_network(url: str) -> bool:
    """Do reads at ``url`` wait on a network (anything but a local folder or ``memory://``)?"""
    return _protocol(url) not in ("file", "memory")


def canonical_url(url: str) -> str:
    """Absolute local path for local URLs (``file://`` stripped), else the URL with its scheme in
    lower case (fsspec knows ``s3``, not ``S3``) and without a trailing ``/``."""
    url = os.fspath(url)
    if _protocol(url) == "file":
        path = url[len("file://"):] if url.lower().startswith("file://") else url
        return os.path.abspath(os.path.expanduser(path))
    scheme, sep, rest = url.partition("://")
    return (scheme.lower() + sep + rest).rstrip("/")


def check_protocol(url: str) -> None:
    """Refuse a URL whose protocol fsspec does not know, or whose file system package is not
    installed, with a :class:`StoreError` naming the URL and what to do."""
    import fsspec
    from fsspec.registry import known_implementations

    for protocol in _protocol(url).split("::"):  # chained URLs (simplecache::s3://...) name several
        try:
            fsspec.get_filesystem_class(protocol)
        except ImportError as e:
            package = known_implementations.get(protocol, {}).get("class", protocol).split(".")[0]
            raise StoreError(f"cannot reach {url}: {protocol}:// needs the package {package!r}, which is not "
                             f"installed ({e}). Install it (pip install {package}).") from None
        except ValueError:
            raise StoreError(f"cannot reach {url}: unknown protocol {protocol}://. Check the URL (a local path, "
                             "file://, s3://, gs://, http(s)://, memory:// or another fsspec protocol).") from None


@dataclass(frozen=True)
class Location:
    """A store URL and the fsspec options needed to reach it.

    ``storage_options`` are this URL's own options; ``given`` is what the caller gave (a plain
    dict or a mapping of URL prefixes, :mod:`deepstrf.store.options`), for the URLs reached
    from this store (a pool's sources).
    """

    url: str
    storage_options: dict[str, Any] | None = field(default=None, compare=False)
    given: StorageOptions = field(default=None, compare=False, repr=False)

    @classmethod
    def parse(cls, url: str | os.PathLike, storage_options: StorageOptions = None) -> "Location":
        url = canonical_url(url)
        return cls(url, options_for(storage_options, url), storage_options)

    @property
    def protocol(self) -> str:
        return _protocol(self.url)

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    @property
    def read_only(self) -> bool:
        return self.protocol in READ_ONLY_PROTOCOLS

    def check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyStoreError(
                f"cannot write to {self.url}: {self.protocol}:// stores are read-only. Write the store "
                "to a local folder or an object store (s3://...) and publish that folder over HTTP.")

    def zarr_store(self, *, read_only: bool = True):
        """A zarr v3 store rooted at this location (LocalStore or FsspecStore)."""
        from zarr.storage import FsspecStore, LocalStore

        from .localfiles import InlineLocalStore

        check_protocol(self.url)
        if self.is_local:
            return InlineLocalStore(self.url, read_only=True) if read_only else LocalStore(self.url, read_only=False)
        if self.protocol in ("s3", "s3a"):  # one client per process and options (s3clients.py)
            fs = process_s3_filesystem(self.fsspec_options())
            return FsspecStore(fs, path=fs._strip_protocol(self.url), read_only=read_only)
        return FsspecStore.from_url(self.url, storage_options=self.fsspec_options(), read_only=read_only)

    def fsspec_options(self) -> dict[str, Any] | None:
        """``storage_options`` with deepstrf's defaults for its protocol (the caller's values win)."""
        if self.protocol not in ("s3", "s3a"):
            return self.storage_options
        return s3_options(self.storage_options)

    def filesystem(self):
        """``(fs, path)``: a synchronous fsspec file system and this location's path in it.

        Listing caches are dropped first: the data may have been written by another client.
        """
        import fsspec

        check_protocol(self.url)
        fs, path = fsspec.url_to_fs(self.url, **(self.storage_options or {}))
        fs.invalidate_cache()
        return fs, path

    def child(self, key: str) -> str:
        """URL of ``key`` inside this store."""
        return f"{self.url}/{key}"

    def sibling(self, name: str) -> "Location":
        """A location next to this one, in the same parent folder or prefix."""
        parent = os.path.dirname(self.url) if self.is_local else posixpath.dirname(self.url)
        joined = os.path.join(parent, name) if self.is_local else f"{parent}/{name}"
        return Location(joined, self.storage_options, self.given)

    @property
    def name(self) -> str:
        return os.path.basename(self.url) if self.is_local else posixpath.basename(self.url)

    def __str__(self) -> str:
        return self.url
