"""Reading a local store's objects in the calling thread.

zarr's ``LocalStore`` reads every object in a worker thread of the event loop
(``asyncio.to_thread``), so that a slow disk never blocks the loop. For the
objects deepstrf reads most often, chunks of small sources (a few KB from the
page cache, microseconds), that round trip (calling thread -> event loop ->
worker thread and back, plus the coroutines and tasks on the way) costs far
more than the read: about 0.3 ms, paid per source and batch. Readers of a
local store call :meth:`InlineLocalStore.read_here` from their own thread
instead (:class:`~deepstrf.store.integrity.StrictStore` passes it on); coroutines
that still reach :meth:`InlineLocalStore.get` have objects up to
:data:`INLINE_BYTES` read in the loop's thread, larger ones in zarr's.
"""

from __future__ import annotations

import os

import numpy as np
from zarr.abc.store import ByteRequest, RangeByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.storage import LocalStore

INLINE_BYTES = 256 << 10


class InlineLocalStore(LocalStore):
    """A read-only ``LocalStore`` that reads in the calling thread (see the module doc)."""

    def read_here(self, key: str, byte_range: RangeByteRequest | None = None) -> np.ndarray | None:
        """Object ``key`` (bytes ``[start, end)`` of it with ``byte_range``) as uint8, or None if absent."""
        try:
            with open(os.path.join(self.root, key), "rb") as f:
                if byte_range is None:
                    return np.frombuffer(f.read(), dtype=np.uint8)
                f.seek(byte_range.start)
                return np.frombuffer(f.read(byte_range.end - byte_range.start), dtype=np.uint8)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    async def get(self, key: str, prototype: BufferPrototype | None = None,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        if byte_range is not None and not isinstance(byte_range, RangeByteRequest):
            return await super().get(key, prototype, byte_range)
        # zarr's own lazy open: concurrent first reads must not each call _open(), which raises on a
        # store another read just opened (zarr >= 3.2 awaits inside LocalStore._open)
        await self._ensure_open()
        if byte_range is None:
            try:
                small = os.stat(os.path.join(self.root, key)).st_size <= INLINE_BYTES
            except OSError:
                small = False  # absent or unreadable: zarr's answer
        else:
            small = byte_range.end - byte_range.start <= INLINE_BYTES
        if not small:
            return await super().get(key, prototype, byte_range)
        data = self.read_here(key, byte_range)
        return None if data is None else (prototype or default_buffer_prototype()).buffer.from_bytes(data.tobytes())
