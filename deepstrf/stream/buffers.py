"""Batch buffers that are reused once the consumer has dropped the batch.

A batch of counts is tens of MB. Fresh memory for every batch makes the
kernel map and zero it page by page (shared memory, which DataLoader workers
build batches in, gets no huge pages), which costs about as much as
decompressing the counts. A :class:`BufferPool` keeps the large buffers of a
pass and hands one out again only when nothing refers to the batch that used
it any more:

- in the process that built the batch, a finalizer on the storage it handed
  out marks the buffer free when the last tensor (or numpy view) of it dies;
- in a DataLoader worker, the batch's tensors cross to the main process as
  shared memory. A :class:`Lease` travels with the batch (a ``CompactBatch``
  attribute); unpickled in the main process, it puts the same finalizer on the
  main process's storage, which writes "released" into a small array the
  worker shares. Pickled again (the batch forwarded to a third process), it
  is inert there: the third process receives copies of the batch's tensors
  (they travel by value, :mod:`.handover`), and the main process's finalizer
  still returns the buffer.

A buffer that is still referenced is never reused: when no free buffer fits,
a fresh one is allocated, so keeping batches (``list(loader)``) is safe and
only costs the fresh memory it always cost. A tensor of a worker's batch sent
on from the main process to another one travels by value (:mod:`.handover`),
so reusing the buffer cannot change it either.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from . import handover

# In the main process smaller arrays (a batch's stimuli, its index arrays) are allocated fresh: their
# pages cost little, while every pooled buffer stays allocated for the whole pass. Three buffers let a worker build a
# batch while the DataLoader queues one and the consumer holds one (measured: more add memory, not speed).
MIN_POOLED_BYTES = 8 << 20
# A worker's arrays smaller than this reach the main process inside the batch's pickle (index arrays):
# cheaper than a shared segment, whose descriptor the consumer fetches from the busy worker
# (handover.py). Larger ones (stimuli) are pooled in shared memory, from a pool of medium buffers
# (measured: 2 MB of stimuli by value cost more than their descriptor's round trip).
BY_VALUE_BYTES = 256 << 10
DEFAULT_SLOTS = 3
# pooled buffers per batch of each format (a compact batch's counts; a dense batch's responses and valid_mask),
# and batches kept: a dense batch of a pool is hundreds of MB, and with one in flight per DataLoader worker a
# worker needs two (the one the consumer still holds, the one it builds)
_POOLED_PER_BATCH = {"compact": 1, "dense": 2}
_BATCHES_KEPT = {"compact": DEFAULT_SLOTS, "dense": 2}
# A new buffer is made this much larger than asked (batches vary in size), in whole GRANULEs.
SLACK = 1 / 8
GRANULE = 1 << 20


def slots_for(collate: str) -> int:
    """Pooled buffers to keep for batches of format ``collate`` (``"compact"`` or ``"dense"``)."""
    return _BATCHES_KEPT[collate] * _POOLED_PER_BATCH[collate]


def torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=np.dtype(dtype))).dtype


def fresh(shape: tuple[int, ...], dtype: np.dtype, shared: bool) -> torch.Tensor:
    """A new uninitialised tensor, in shared memory when ``shared``; fill it through ``.numpy()``.

    Private buffers come from numpy, which asks for huge pages on large
    arrays (torch's allocator does not). Shared ones are made by torch, so
    that a DataLoader hands them over without a copy: a ``torch.from_numpy``
    wrapper of shared memory is not known as shared and would be copied.
    Their pages are mapped as they are filled: mapping them ahead, in a
    thread, took CPU from the pass's first reads and decoding (2 workers over
    S3, first epoch: 161 items/s with it, 180 without, 8 alternating pairs).
    """
    if not shared:
        return torch.from_numpy(np.empty(shape, dtype=np.dtype(dtype)))
    storage = shared_storage(int(np.prod(shape)) * np.dtype(dtype).itemsize)
    return torch.empty(0, dtype=torch_dtype(dtype)).set_(storage).view(shape)


def shared_storage(nbytes: int) -> torch.UntypedStorage:
    """``nbytes`` of shared memory, sent to other processes by descriptor. On Linux an anonymous
    memory file (``memfd_create``): made at once, its pages allocated as they are mapped, and not
    bounded by the size of /dev/shm. torch's own (elsewhere) allocates every page of the segment
    up front (``posix_fallocate``: 7 ms for 50 MB, unloaded, 30 ms with two workers starting)."""
    if not hasattr(os, "memfd_create"):
        return torch.UntypedStorage._new_shared(nbytes, device="cpu")
    fd = os.memfd_create("deepstrf-batch", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, nbytes)
        return torch.UntypedStorage._new_shared_fd_cpu(fd, nbytes)  # maps a duplicate of fd
    finally:
        os.close(fd)


def _release(released: np.ndarray, slot: int, generation: int) -> None:
    released[slot] = generation


class Lease:
    """A pooled buffer of a worker's batch, carried by the batch to the main process.

    ``state``: ``"outbound"`` in the worker (inert); ``"watching"`` once
    unpickled in the main process, where it returns the buffer to the worker's
    pool when the main process's storage of ``tensor`` dies; ``"inert"`` once
    pickled again from there (the batch forwarded to a third process, which
    receives copies of its tensors). ``generation`` counts the uses of the buffer.
    """

    def __init__(self, tensor: torch.Tensor, released: torch.Tensor, slot: int, generation: int,
                 state: str = "outbound") -> None:
        self.tensor, self.released, self.slot, self.generation = tensor, released, slot, generation
        self.state = state
        self._finalizer: weakref.finalize | None = None
        if state == "watching":
            self._finalizer = weakref.finalize(tensor.untyped_storage(), _release, released.numpy(), slot,
                                               generation)
            self._finalizer.atexit = False

    def __reduce__(self):
        state = "watching" if self.state == "outbound" else "inert"
        return (Lease, (self.tensor, self.released, self.slot, self.generation, state))


@dataclass
class _Slot:
    buffer: torch.Tensor  # uint8, the whole capacity
    generation: int = 0   # uses so far; free when the pool's released[slot] equals it


class BufferPool:
    """Large batch buffers of one pass, reused once released (see the module doc).

    :meth:`alloc` is thread-safe. ``slots=0`` turns reuse off (every buffer fresh).
    In shared mode, :meth:`leases` gives the leases a batch must carry.
    """

    def __init__(self, shared: bool, slots: int = DEFAULT_SLOTS, *, medium: bool = False,
                 released: torch.Tensor | None = None) -> None:
        self.shared = shared
        self.medium = medium
        self.max_slots = slots
        self.slots: list[_Slot] = []
        n = max(slots, 1)
        # a shared pool keeps medium-sized buffers (a batch's stimuli) in a pool of its own, so that
        # they too cross to the main process by name (handover.py) and never take a large slot
        with_medium = shared and slots > 0 and not medium
        if released is None:  # one array for both pools: its descriptor crosses once
            released = fresh((2 * n if with_medium else n,), np.int64, shared)
            released.numpy()[:] = 0
            if shared:
                handover.send_by_reference(released.untyped_storage(), f"{id(self)}:released")
        # generation of each slot's last use that the consumer dropped
        self.released = released[:n]
        self._released = self.released.numpy()
        self._medium = BufferPool(shared, slots, medium=True, released=released[n:]) if with_medium else None
        self._pending: dict[int, Lease] = {}  # data_ptr -> lease of a shared buffer handed out
        self._lock = threading.Lock()
        self.reuses = 0  # buffers handed out again (diagnostics, tests)
        self.largest = 0  # the largest pooled request so far: new buffers get at least its size

    def alloc(self, shape: tuple[int, ...], dtype: np.dtype) -> torch.Tensor:
        """An uninitialised tensor (shared memory in shared mode): a free pooled buffer if one
        fits, else a new pooled buffer while there are fewer than ``slots``, else fresh memory."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if self.shared and nbytes < min(BY_VALUE_BYTES, MIN_POOLED_BYTES):  # crosses inside the pickle
            small = fresh(shape, dtype, shared=False)
            handover.send_by_value(small.untyped_storage())
            return small
        if nbytes < MIN_POOLED_BYTES and not self.medium:
            return self._medium.alloc(shape, dtype) if self._medium is not None else fresh(shape, dtype, self.shared)
        if self.max_slots == 0:
            return fresh(shape, dtype, self.shared)
        with self._lock:
            self.largest = max(self.largest, nbytes)
            i = self._take(nbytes)
            if i is None:
                return fresh(shape, dtype, self.shared)
            slot = self.slots[i]
            slot.generation += 1
            self.reuses += slot.generation > 1
            out = slot.buffer[:nbytes].view(torch_dtype(dtype)).view(shape)
            if self.shared:
                self._pending[out.data_ptr()] = Lease(out, self.released, i, slot.generation)
                return out
        # a storage of its own, whose death (the consumer's last reference) frees the slot
        mine = torch.from_numpy(out.numpy())
        weakref.finalize(mine.untyped_storage(), _release, self._released, i, slot.generation).atexit = False
        return mine

    def _take(self, nbytes: int) -> int | None:
        """Index of the slot to use for ``nbytes``, allocating or growing one if needed."""
        free = [i for i, s in enumerate(self.slots) if self._released[i] == s.generation]
        fits = [i for i in free if self.slots[i].buffer.numel() >= nbytes]
        if fits:
            return min(fits, key=lambda i: self.slots[i].buffer.numel())
        if len(self.slots) < self.max_slots:
            self.slots.append(_Slot(self._new_buffer(nbytes, len(self.slots))))
            return len(self.slots) - 1
        if free:  # too small: replace the largest free buffer by a larger one
            i = max(free, key=lambda i: self.slots[i].buffer.numel())
            self.slots[i] = _Slot(self._new_buffer(nbytes, i), self.slots[i].generation)
            return i
        return None

    def _new_buffer(self, nbytes: int, slot: int) -> torch.Tensor:
        """Slot ``slot``'s buffer for at least ``nbytes`` and the largest request so far, with room
        to spare: batches vary in size, and each buffer that has to be replaced by a larger one is
        memory the kernel maps and zeroes again."""
        capacity = -(-int(max(nbytes, self.largest) * (1 + SLACK)) // GRANULE) * GRANULE
        buffer = fresh((capacity,), np.uint8, self.shared)
        if self.shared:
            handover.send_by_reference(buffer.untyped_storage(), f"{id(self)}:{slot}")
        return buffer

    def leases(self, tensors: Iterable[torch.Tensor]) -> list[Lease]:
        """The leases of those of ``tensors`` that are pooled shared buffers (each given once)."""
        tensors = list(tensors)
        with self._lock:
            mine = [lease for t in tensors if (lease := self._pending.pop(t.data_ptr(), None)) is not None]
        return mine + (self._medium.leases(tensors) if self._medium is not None else [])


_PROCESS_POOLS: dict[tuple[int, str], BufferPool] = {}  # (pid, format) -> this process's shared pool


def process_pool(fmt: str) -> BufferPool:
    """This process's shared-memory pool for batches of format ``fmt``, kept for the life of the
    process: a DataLoader worker builds its batches there (whether the dataset or a collate
    function builds them), and a persistent worker's later passes reuse the memory its first one
    mapped and zeroed. A forked process makes its own."""
    key = (os.getpid(), fmt)
    if key not in _PROCESS_POOLS:
        for inherited in [k for k in _PROCESS_POOLS if k[0] != key[0]]:  # a forked process drops its parent's
            del _PROCESS_POOLS[inherited]
        _PROCESS_POOLS[key] = BufferPool(shared=True, slots=slots_for(fmt))
    return _PROCESS_POOLS[key]
