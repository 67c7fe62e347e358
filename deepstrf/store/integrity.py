"""Integrity: strict chunk reads, content digests and the store fingerprint.

zarr fills a missing chunk with the fill value; for spike counts that is
wrong data, not an error. :class:`StrictStore` turns a missing chunk into
:class:`MissingChunk`, and the reader reports it (like a crc32c mismatch)
as :class:`~deepstrf.errors.IntegrityError` naming the store and the cells.
"""

from __future__ import annotations

import hashlib
import json
import threading
import warnings
from typing import Any

import numpy as np
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.storage import WrapperStore

from .format import NON_CONTENT_ATTRS


class MissingChunk(KeyError):
    """A chunk object that every complete store has is absent."""


class RangesIgnoredWarning(RuntimeWarning):
    """A store's server answers byte-range requests with whole objects."""


def is_chunk_key(key: str) -> bool:
    """Chunk keys of zarr v3's default encoding: ``<array>/c/<i>[/<j>...]``."""
    return key.startswith("c/") or "/c/" in key


class IOCounters:
    """Requests made to a store and bytes it returned (as stored: compressed), in this process;
    also added to ``parent`` (a pool's total over the sources it opened) when one is set."""

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        self.parent: IOCounters | None = None
        self._lock = threading.Lock()  # zarr's event loop and read threads both count

    def __getstate__(self) -> dict:  # a new process counts from zero
        return {"parent": self.parent}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        self.parent = state["parent"]

    def add(self, requests: int, nbytes: int) -> None:
        with self._lock:
            self.requests += requests
            self.bytes += nbytes
        if self.parent is not None:
            self.parent.add(requests, nbytes)

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.requests, self.bytes


class StrictStore(WrapperStore):
    """Wrapper raising :class:`MissingChunk` instead of returning nothing for a chunk key,
    and counting the requests and bytes that go through it (:attr:`counters`)."""

    def __init__(self, store, counters: IOCounters | None = None) -> None:
        super().__init__(store)
        self.counters = counters or IOCounters()
        self._warned_ranges = False  # about a server that ignores byte ranges (once per store)

    def _with_store(self, store):
        return type(self)(store, self.counters)

    async def get(self, key, prototype, byte_range=None):
        return self._received(key, await self._store.get(key, prototype, byte_range), byte_range)

    def _received(self, key: str, value, byte_range=None):
        """``value`` as read for ``key``, counted; a missing chunk raises :class:`MissingChunk`; the
        whole object, sent for a range by a server that ignores ranges, is cut to that range."""
        self.counters.add(1, 0 if value is None else len(value))
        if value is None and is_chunk_key(key):
            raise MissingChunk(key)
        if value is not None and byte_range is not None:
            return self._within(key, value, byte_range)
        return value

    def _within(self, key: str, value, byte_range):
        if isinstance(byte_range, RangeByteRequest):
            start, end = byte_range.start, byte_range.end
        elif isinstance(byte_range, SuffixByteRequest):
            start, end = len(value) - byte_range.suffix, len(value)
        else:  # from an offset: a whole object cannot be told from the rest of one
            return value
        if len(value) <= end - start or len(value) < end:
            return value  # as asked (or short: the reader reports that)
        if not self._warned_ranges:
            self._warned_ranges = True
            warnings.warn(f"the server of this store sent all {len(value)} bytes of {key} for bytes {start}-{end}: "
                          "it ignores byte ranges (python -m http.server does). Reads stay correct but fetch whole "
                          "objects; serve the store with a server that honours Range requests.",
                          RangesIgnoredWarning, stacklevel=2)
        return value[start:end]

    @property
    def reads_here(self) -> bool:
        """Can :meth:`read_here` read in the calling thread (a local store)?"""
        return hasattr(self._store, "read_here")

    def read_here(self, key: str, byte_range=None):
        """Object ``key`` (uint8) read in the calling thread, for stores that can (:attr:`reads_here`)."""
        return self._received(key, self._store.read_here(key, byte_range), byte_range)

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        values = await self._store.get_partial_values(prototype, key_ranges)
        self.counters.add(len(key_ranges), sum(len(v) for v in values if v is not None))
        for (key, _), value in zip(key_ranges, values):
            if value is None and is_chunk_key(key):
                raise MissingChunk(key)
        return [value if value is None or byte_range is None else self._within(key, value, byte_range)
                for (key, byte_range), value in zip(key_ranges, values)]

    async def _get_many(self, requests):
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)


def array_digest(hasher: "hashlib._Hash") -> str:
    return "sha256:" + hasher.hexdigest()


def content_hasher() -> "hashlib._Hash":
    """Hasher for an array's logical content: its C-order little-endian bytes."""
    return hashlib.sha256()


def update(hasher: "hashlib._Hash", data: np.ndarray) -> None:
    data = np.ascontiguousarray(data)
    if data.dtype.byteorder == ">":
        data = data.astype(data.dtype.newbyteorder("<"))
    hasher.update(memoryview(data).cast("B"))


def fingerprint(attrs: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the content attributes (which include every array's digest)."""
    content = {k: v for k, v in attrs.items() if k not in NON_CONTENT_ATTRS}
    doc = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return "sha256:" + hashlib.sha256(doc.encode("ascii")).hexdigest()
