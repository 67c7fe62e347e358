"""A bounded on-disk LRU cache of raw rows, for remote stores.

Each entry is one stim's valid cells for one neuron selection (a
:class:`~deepstrf.datasets.views.RawRow`), compressed with blosc-lz4 and
written atomically (temporary file + rename), so DataLoader workers and
several runs can share one directory. After every write the directory is
scanned and the least recently used entries are deleted until it holds at
most ``max_bytes``; hits refresh an entry's modification time.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numcodecs import Blosc

from ..datasets.views import RawRow

_CODEC = Blosc(cname="lz4", clevel=3, shuffle=Blosc.BITSHUFFLE)
_SUFFIX = ".row"


class RowCache:
    """Rows of one dataset and neuron selection, keyed by stim index."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int, namespace: str,
                 neurons: Sequence[int] | None) -> None:
        if max_bytes <= 0:
            raise ValueError(f"cache_bytes must be > 0, got {max_bytes}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        key = json.dumps([namespace, None if neurons is None else [int(n) for n in neurons]])
        self._prefix = hashlib.sha1(key.encode()).hexdigest()[:16]

    def _path(self, stim: int) -> Path:
        return self.directory / f"{self._prefix}-{stim}{_SUFFIX}"

    def get(self, stim: int) -> RawRow | None:
        """The cached row of ``stim``, or None."""
        path = self._path(stim)
        try:
            blob = path.read_bytes()
            os.utime(path)
        except FileNotFoundError:
            return None
        header_len = int.from_bytes(blob[:4], "little")
        header = json.loads(blob[4:4 + header_len])
        n = header["cells"]
        index = np.frombuffer(blob, dtype=np.int64, count=3 * n, offset=4 + header_len).reshape(3, n)
        # decoded into memory of its own: items made from the row may be edited in place
        values = np.empty(int((index[1] * index[2]).sum()), dtype=header["dtype"])
        _CODEC.decode(blob[4 + header_len + index.nbytes:], out=values)
        return RawRow(stim, index[0].copy(), index[1].copy(), index[2].copy(), values)

    def put(self, row: RawRow) -> None:
        """Store ``row`` and evict least recently used entries beyond ``max_bytes``."""
        header = json.dumps({"cells": len(row.neurons), "dtype": row.values.dtype.str}).encode()
        index = np.stack([row.neurons, row.repeats, row.lengths]).astype(np.int64)
        blob = b"".join([len(header).to_bytes(4, "little"), header, index.tobytes(),
                         _CODEC.encode(np.ascontiguousarray(row.values))])
        if len(blob) > self.max_bytes:
            return
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, self._path(row.stim))
        self._evict()

    def _evict(self) -> None:
        entries = []
        for entry in os.scandir(self.directory):
            if entry.name.endswith(_SUFFIX):
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                entries.append((st.st_mtime_ns, st.st_size, entry.path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            total -= size

    def size(self) -> int:
        """Bytes currently held by the directory's entries."""
        return sum(e.stat().st_size for e in os.scandir(self.directory) if e.name.endswith(_SUFFIX))
