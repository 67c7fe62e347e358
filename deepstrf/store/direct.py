"""Whole reads of the small arrays deepstrf writes, decoded here rather than by zarr.

A source store's index, repeats and metadata are small arrays (a few hundred
bytes for a session of 10 stims x 20 neurons) chunked along their first axis,
with the codecs ``bytes`` -> ``blosc`` -> ``crc32c`` (``docs/format.md``).
Reading one through zarr costs about 0.7 ms of Python per array (codec
pipeline objects, a thread hop per codec); fetching its chunk objects and
decoding them here costs about 0.03 ms, which is what opening 10^4 pooled
sources needs. Arrays laid out any other way are left to zarr
(:meth:`SmallArray.of` is None).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import numpy as np
from numcodecs import blosc
from zarr.core.buffer import default_buffer_prototype

from .integrity import MissingChunk
from .layout import blosc_nbytes, check_crc, chunk_shape, compressed_chunks, plain_dtype, slash_chunk_keys


@dataclass(frozen=True)
class SmallArray:
    """An array chunked along its first axis only, in deepstrf's chunk codecs, read whole."""

    store: Any
    path: str
    shape: tuple[int, ...]
    chunk: int
    dtype: np.dtype

    @classmethod
    def of(cls, store: Any, path: str, meta: dict[str, Any]) -> "SmallArray | None":
        """A reader of the array at ``path`` described by ``meta`` (its ``zarr.json``), if laid out this way."""
        dtype = plain_dtype(meta)
        shape = tuple(int(n) for n in meta.get("shape") or ())
        chunks = chunk_shape(meta)
        if (dtype is None or not shape or chunks is None or len(chunks) != len(shape) or chunks[1:] != shape[1:]
                or chunks[0] < 1 or not slash_chunk_keys(meta)
                or not compressed_chunks(meta.get("codecs") or [], dtype)):
            return None
        return cls(store, path, shape, chunks[0], dtype)

    def key(self, k: int) -> str:
        return "/".join([f"{self.path}/c", str(k), *("0" * (len(self.shape) - 1))])

    async def read(self) -> np.ndarray:
        """The whole array: its chunk objects fetched concurrently, checked and decoded. The last
        chunk is fetched first: an array declaring more than the store holds fails on it, before
        its declared size is allocated."""
        n = self._n_chunks()
        if not n:
            return np.empty(self.shape, dtype=self.dtype)
        last = await self._fetch(n - 1)
        blobs = await asyncio.gather(*(self._fetch(k) for k in range(n - 1)))
        return self._assemble([*blobs, last])

    def read_here(self) -> np.ndarray:
        """:meth:`read` in the calling thread, for a store that reads there (local files)."""
        n = self._n_chunks()
        last = self.store.read_here(self.key(n - 1)) if n else None
        return self._assemble([self.store.read_here(self.key(k)) for k in range(n - 1)] + ([last] if n else []))

    def _n_chunks(self) -> int:
        return -(-self.shape[0] // self.chunk) if np.prod(self.shape) else 0

    async def _fetch(self, k: int) -> np.ndarray | None:
        buf = await self.store.get(self.key(k), default_buffer_prototype())
        return None if buf is None else buf.as_numpy_array()

    def _assemble(self, blobs: list[np.ndarray | None]) -> np.ndarray:
        """The array from its chunk objects, allocated once every one of them is known to be there."""
        for k, data in enumerate(blobs):
            if data is None:
                raise MissingChunk(self.key(k))
        out = np.empty(self.shape, dtype=self.dtype)
        for k, data in enumerate(blobs):
            self._decode_chunk(k, data, out)
        return out

    def _decode_chunk(self, k: int, data: np.ndarray, out: np.ndarray) -> None:
        body = check_crc(np.asarray(data).view(np.uint8), self.key(k))
        nbytes = self.chunk * int(np.prod(self.shape[1:])) * self.dtype.itemsize
        if blosc_nbytes(body) != nbytes:  # checked before decompressing what it claims to hold
            raise ValueError(f"{self.key(k)}: the chunk says it holds {blosc_nbytes(body)} bytes, not the "
                             f"{nbytes} of its chunk shape")
        chunk = np.frombuffer(blosc.decompress(body), dtype=self.dtype).reshape(self.chunk, *self.shape[1:])
        part = out[k * self.chunk:(k + 1) * self.chunk]
        part[...] = chunk[:len(part)]  # the last chunk is stored whole, padded past the array's end
