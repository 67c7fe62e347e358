"""Reading while the workers start: a pass's first batches come from the main process.

A DataLoader worker started by forkserver or spawn needs a while before its
first batch: the worker server imports torch once (seconds), then every worker
unpickles the dataset and opens it again. :class:`StreamingDataLoader` starts
its workers in a background thread and meanwhile reads the pass's first
batches in the main process, as the consumer asks for them. When the first
worker has opened the dataset and begins its pass, the main process stops
claiming batches; the workers then share the rest of the pass round robin,
from the first batch the main process did not claim. The consumer sees the
pass's batches in their planned order whatever number the main process read.

That number is decided once per pass and kept here, in shared memory: the main
process claims batches one at a time under a lock of its own and closes the
count as soon as a worker starts (or when it has claimed the whole pass); a
worker waits (milliseconds) for the count to be closed before its first read.
"""

from __future__ import annotations

import threading
import time

import torch

_OPEN = 0  # the value of an open count; a closed count after k claimed batches is stored as k + 1
_POLL_S = 0.001


class Lead:
    """How many of a pass's first batches the main process reads itself (see module docstring).

    Closed at 0 unless a :class:`StreamingDataLoader` pass opened it, so workers of
    any other DataLoader read their whole share.
    """

    def __init__(self) -> None:
        self._closed_after = torch.ones(1, dtype=torch.int64).share_memory_()
        self._claimed = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"_closed_after": self._closed_after, "_claimed": 0}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def open(self) -> None:
        """A pass starts in the main process: it may claim batches from the first."""
        with self._lock:
            self._claimed = 0
            self._closed_after[0] = _OPEN

    def reset(self) -> None:
        """Closed at 0: workers read their whole share (a pass without a lead, or after one)."""
        with self._lock:
            self._claimed = 0
            self._closed_after[0] = 1

    def is_closed(self) -> bool:
        return int(self._closed_after[0]) != _OPEN

    def close(self) -> None:
        """Claim nothing more (workers then skip the batches claimed so far)."""
        with self._lock:
            if int(self._closed_after[0]) == _OPEN:
                self._closed_after[0] = self._claimed + 1

    def claim(self, n_batches: int) -> int | None:
        """The next batch for the main process to read, or None once the count is closed (it is
        closed here when all ``n_batches`` of the pass are claimed)."""
        with self._lock:
            if int(self._closed_after[0]) != _OPEN:
                return None
            if self._claimed >= n_batches:
                self._closed_after[0] = self._claimed + 1
                return None
            self._claimed += 1
            return self._claimed - 1

    def wait_closed(self, timeout_s: float, where: str) -> int:
        """In a worker: the number of batches the main process claimed, once it stops claiming."""
        deadline = time.monotonic() + timeout_s
        while (value := int(self._closed_after[0])) == _OPEN:
            if time.monotonic() > deadline:
                raise RuntimeError(f"streaming {where}: a DataLoader worker waited {timeout_s:g} s for the main "
                                   "process to stop reading the pass's first batches; is the main process alive?")
            time.sleep(_POLL_S)
        return value - 1
