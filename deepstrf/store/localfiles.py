"""Reading small objects of a local store without a thread hop.

zarr's ``LocalStore`` reads every object in a worker thread
(``asyncio.to_thread``), so that a slow disk never blocks the event loop. For
the objects deepstrf reads most often, a chunk of a small source (a few KB
from the page cache, microseconds), the hop there and back costs more than
the read: about 0.1-0.2 ms, paid once per source and batch. Objects (or
ranges) up to :data:`INLINE_BYTES` are read in the loop's own thread here;
larger ones still go through zarr's thread.
"""

from __future__ import annotations

import os

from zarr.abc.store import ByteRequest, RangeByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.storage import LocalStore

INLINE_BYTES = 256 << 10


class InlineLocalStore(LocalStore):
    """A ``LocalStore`` that reads small objects inline (see the module doc)."""

    async def get(self, key: str, prototype: BufferPrototype | None = None,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        if byte_range is not None and not isinstance(byte_range, RangeByteRequest):
            return await super().get(key, prototype, byte_range)
        if not self._is_open:
            await self._open()
        path = os.path.join(self.root, key)
        try:
            with open(path, "rb") as f:
                if byte_range is None:
                    if os.fstat(f.fileno()).st_size > INLINE_BYTES:
                        return await super().get(key, prototype, byte_range)
                    data = f.read()
                elif byte_range.end - byte_range.start > INLINE_BYTES:
                    return await super().get(key, prototype, byte_range)
                else:
                    data = os.pread(f.fileno(), byte_range.end - byte_range.start, byte_range.start)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        return (prototype or default_buffer_prototype()).buffer.from_bytes(data)
