"""How a DataLoader worker's batch tensors reach the main process.

torch sends a shared-memory storage as a file descriptor that the receiving
process fetches from the sender over a socket: it connects, both sides run
multiprocessing's HMAC handshake, the descriptor is passed. The sender's end
is a thread of a worker that is busy building the next batch, so each
storage costs the consumer a round trip that waits for that worker's CPU and
GIL (2-40 ms per batch of four storages, measured on a 2-core machine). A
worker builds its batches in a few buffers it reuses (:mod:`.buffers`), so:

- a pooled buffer's descriptor is sent with the first batch that uses it;
  the main process keeps it (one per buffer of each worker) and maps it again
  for every later batch, which carries only the buffer's name (a batch's
  counts and its stimuli are built in pooled buffers);
- a batch's small arrays (its index arrays) travel inside the pickle, by
  value: copying them costs less than a round trip.

Every other storage goes torch's way. The main process closes the
descriptors it kept for a worker once that worker has exited
(:func:`forget_exited`, also run whenever a new worker's first buffer arrives).
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass
from multiprocessing.reduction import DupFd, ForkingPickler

import torch
from torch.multiprocessing import reductions

# pooled storages of this process that go by reference: data_ptr -> their name and whether it was sent
_BY_REFERENCE: dict[int, _Named] = {}
# small storages of this process that go by value: data_ptr -> owning pid
_BY_VALUE: dict[int, int] = {}
_install_lock = threading.Lock()
_installed_in: int | None = None

# main process: the descriptors kept per (sender pid, buffer name)
_KEPT: dict[tuple[int, str], tuple[int, int]] = {}  # -> (fd, nbytes)
_kept_lock = threading.Lock()
RECEIVED = {"descriptors": 0, "by_name": 0}  # storages received each way (diagnostics, tests)


@dataclass
class _Named:
    pid: int
    name: str
    nbytes: int
    sent: bool = False


def send_by_reference(storage: torch.UntypedStorage, name: str) -> None:
    """Send ``storage`` (shared memory this process reuses for many batches) by its descriptor
    once, then by ``name`` (unique in this process, per buffer; a new buffer takes over the
    descriptor kept under its name)."""
    _install()
    ptr = storage.data_ptr()
    _BY_REFERENCE[ptr] = _Named(os.getpid(), name, storage.nbytes())
    weakref.finalize(storage, _BY_REFERENCE.pop, ptr, None).atexit = False


def send_by_value(storage: torch.UntypedStorage) -> None:
    """Send ``storage`` (small, private memory) inside the pickle."""
    _install()
    ptr = storage.data_ptr()
    _BY_VALUE[ptr] = os.getpid()
    weakref.finalize(storage, _BY_VALUE.pop, ptr, None).atexit = False


def sent_by_value(storage: torch.UntypedStorage) -> bool:
    """Does ``storage`` travel inside the pickle (see :func:`send_by_value`)?"""
    return _BY_VALUE.get(storage.data_ptr()) == os.getpid()


def _install() -> None:
    global _installed_in
    with _install_lock:
        if _installed_in != os.getpid():
            ForkingPickler.register(torch.UntypedStorage, _reduce_storage)
            _installed_in = os.getpid()


def _reduce_storage(storage: torch.UntypedStorage):
    if storage.device.type == "cpu":
        ptr, pid = storage.data_ptr(), os.getpid()
        named = _BY_REFERENCE.get(ptr)
        if named is not None and named.pid == pid and named.nbytes == storage.nbytes():
            if named.sent:
                return _rebuild_named, (pid, named.name)
            fd, size = storage._share_fd_cpu_()
            named.sent = True
            return _rebuild_and_keep, (pid, named.name, DupFd(fd), size)
        if sent_by_value(storage):
            return _rebuild_from_bytes, (torch.empty(0, dtype=torch.uint8).set_(storage).numpy().tobytes(),)
    return reductions.reduce_storage(storage)


def _rebuild_from_bytes(data: bytes) -> torch.UntypedStorage:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).untyped_storage() if data else torch.UntypedStorage(0)


def _rebuild_and_keep(pid: int, name: str, df: DupFd, size: int) -> torch.UntypedStorage:
    fd = df.detach()
    with _kept_lock:
        RECEIVED["descriptors"] += 1
        new_sender = not any(p == pid for p, _ in _KEPT)
        old = _KEPT.pop((pid, name), None)
        _KEPT[(pid, name)] = (fd, size)
    if old is not None:
        os.close(old[0])
    if new_sender:
        forget_exited()
    return torch.UntypedStorage._new_shared_fd_cpu(fd, size)


def _rebuild_named(pid: int, name: str) -> torch.UntypedStorage:
    with _kept_lock:
        kept = _KEPT.get((pid, name))
        if kept is None:
            raise RuntimeError(
                f"a batch from DataLoader worker (pid {pid}) names its shared buffer {name!r}, which this process "
                "never received: an earlier batch of that worker, which carried the buffer, was dropped before it "
                "was unpickled here. What to do: unpickle a worker's batches in the order it sent them, or turn "
                "buffer reuse off (StreamingNeuralDataset(..., reuse_buffers=False))")
        RECEIVED["by_name"] += 1
        # mapped while the lock is held: forget_exited must not close the descriptor meanwhile
        return torch.UntypedStorage._new_shared_fd_cpu(*kept)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    return True


def forget_exited() -> int:
    """Close the descriptors kept for worker processes that have exited (the shared memory of
    their buffers is freed once no batch of theirs is left either); returns how many."""
    with _kept_lock:
        gone = [key for key in _KEPT if not _alive(key[0])]
        fds = [_KEPT.pop(key)[0] for key in gone]
    for fd in fds:
        os.close(fd)
    return len(fds)


def kept_descriptors() -> int:
    """How many descriptors this process keeps for workers' buffers (diagnostics, tests)."""
    return len(_KEPT)
