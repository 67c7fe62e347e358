"""How a DataLoader worker's batch tensors reach the main process.

torch sends a shared-memory storage as a file descriptor that the receiving
process fetches from the sender over a socket: it connects, both sides run
multiprocessing's HMAC handshake, the descriptor is passed. The sender's end
is a thread of a worker that is busy building the next batch, so each
storage costs the consumer a round trip that waits for that worker's CPU and
GIL (2-40 ms per batch of four storages, measured on a 2-core machine). A
worker builds its batches in a few buffers it reuses (:mod:`.buffers`), so:

- a pooled buffer's descriptor is sent once, with the first batch that uses
  it; the main process keeps it (one per buffer of each worker), maps it once
  and gives every later batch, which carries only the buffer's name, a new
  storage over that mapping (a batch's counts and its stimuli are built in
  pooled buffers). A mapping made per batch would fault every page in again
  whenever the consumer reads a batch (the consumer's CPU time per batch read:
  1.69-1.88x that of a batch built in the main process, against 1.04-1.26x
  with the kept mapping, on a 2-core machine). Those storages are plain memory to
  torch (``is_shared()`` is False); sent on to another process, they travel
  by value (their bytes in the pickle), so a later batch cannot overwrite the
  copy, and the main process's tensor stays where it is;
- a forked worker does not wait to be asked for that descriptor: it pushes it
  (``SCM_RIGHTS``) onto a socket its parent opened before the fork
  (:func:`open_channel`), and the batch carries the name. The consumer reads
  the descriptor from its end of the socket when it unpickles the batch,
  without a round trip to the busy worker; where the socket is full or absent
  (a worker started by forkserver or spawn) the descriptor goes torch's way;
- a batch's small arrays (its index arrays) travel inside the pickle, by
  value: copying them costs less than a round trip.

Every other storage goes torch's way. The main process closes the
descriptors it kept for a worker once that worker has exited
(:func:`forget_exited`, also run whenever a new worker's first buffer arrives).
"""

from __future__ import annotations

import array
import atexit
import itertools
import json
import mmap
import os
import socket
import threading
import weakref
from dataclasses import dataclass
from multiprocessing.reduction import DupFd, ForkingPickler

import torch
from torch.multiprocessing import reductions

from ..forksafe import process_alive

# pooled storages of this process that go by reference: data_ptr -> their name and whether it was sent
_BY_REFERENCE: dict[int, _Named] = {}
_install_lock = threading.Lock()
_installed_in: int | None = None

_serials = itertools.count()  # tells apart the buffers that take a name in turn

# main process: the descriptors kept per (sender pid, buffer name)
_KEPT: dict[tuple[int, str], _Kept] = {}
_kept_lock = threading.Lock()
# storages received each way (diagnostics, tests): descriptors fetched from the sender, pushed by it, by name
RECEIVED = {"descriptors": 0, "pushed": 0, "by_name": 0}


@dataclass
class _Named:
    pid: int
    name: str
    serial: int
    nbytes: int
    sent: bool = False


@dataclass
class _Kept:
    fd: int
    nbytes: int
    serial: int
    mapping: mmap.mmap | None = None

    def storage(self) -> torch.UntypedStorage:
        """A new storage over the buffer, mapped once in this process (see module docstring); it
        keeps the mapping alive while a batch refers to it."""
        if self.mapping is None:
            self.mapping = mmap.mmap(self.fd, self.nbytes)
        storage = torch.frombuffer(self.mapping, dtype=torch.uint8).untyped_storage()
        send_by_value(storage)
        return storage


@dataclass
class _Channel:
    """A socket pair whose ``owner`` reads the descriptors its forked children push on it."""
    owner: int
    receiver: socket.socket
    sender: socket.socket


_CHANNELS: dict[int, _Channel] = {}  # by owner pid: a forked child inherits its parent's
_MESSAGE_BYTES = 512


def open_channel() -> None:
    """Let the workers this process forks from now on push their buffers' descriptors to it
    (idempotent; call before the workers start)."""
    pid = os.getpid()
    with _install_lock:
        if pid not in _CHANNELS:
            receiver, sender = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            _CHANNELS[pid] = _Channel(pid, receiver, sender)
            atexit.register(_close_channel, pid)


def _close_channel(owner: int) -> None:
    """Close the channel that ``owner`` opened, in ``owner`` only (a forked child inherits the hook)."""
    if os.getpid() == owner and (channel := _CHANNELS.pop(owner, None)) is not None:
        channel.receiver.close()
        channel.sender.close()


def send_by_reference(storage: torch.UntypedStorage, name: str) -> None:
    """Send ``storage`` (shared memory this process reuses for many batches) by its descriptor
    once, then by ``name`` (unique in this process, per buffer; a new buffer takes over the
    descriptor kept under its name)."""
    _install()
    ptr = storage.data_ptr()
    _BY_REFERENCE[ptr] = _Named(os.getpid(), name, next(_serials), storage.nbytes())
    weakref.finalize(storage, _BY_REFERENCE.pop, ptr, None).atexit = False


def send_by_value(storage: torch.UntypedStorage) -> None:
    """Send ``storage`` inside the pickle: small private memory, or a worker's buffer received
    here (torch would move it into new shared memory to send it, freeing the memory that numpy
    views of it, such as the pool's release array, still point to). The mark is an attribute of
    the storage object, which torch keeps for as long as any tensor uses the storage."""
    _install()
    storage._deepstrf_by_value = True


def sent_by_value(storage: torch.UntypedStorage) -> bool:
    """Does ``storage`` travel inside the pickle (see :func:`send_by_value`)?"""
    return getattr(storage, "_deepstrf_by_value", False)


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
                return _rebuild_named, (pid, named.name, named.serial)
            fd, size = storage._share_fd_cpu_()
            named.sent = True
            if _push(named, fd, size):
                return _rebuild_named, (pid, named.name, named.serial)
            return _rebuild_and_keep, (pid, named.name, named.serial, DupFd(fd), size)
        if sent_by_value(storage):
            return _rebuild_from_bytes, (torch.empty(0, dtype=torch.uint8).set_(storage).numpy().tobytes(),)
    return reductions.reduce_storage(storage)


def _rebuild_from_bytes(data: bytes) -> torch.UntypedStorage:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).untyped_storage() if data else torch.UntypedStorage(0)


def _push(named: _Named, fd: int, size: int) -> bool:
    """Push a buffer's descriptor to the parent, if it opened a channel and has room for it."""
    channel = _CHANNELS.get(os.getppid())
    if channel is None:
        return False
    message = json.dumps([named.pid, named.name, named.serial, size]).encode()
    try:
        channel.sender.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))],
                               socket.MSG_DONTWAIT)
    except OSError:  # full, or the descriptor limit: it goes the slow way
        return False
    return True


def _drain_locked() -> None:
    """Keep every descriptor pushed to this process so far (called with ``_kept_lock`` held)."""
    channel = _CHANNELS.get(os.getpid())
    if channel is None:
        return
    fd_space = socket.CMSG_SPACE(array.array("i").itemsize)
    while True:
        try:
            message, ancillary, _, _ = channel.receiver.recvmsg(_MESSAGE_BYTES, fd_space, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        fds = array.array("i")
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        if not fds:
            continue
        pid, name, serial, size = json.loads(message)
        RECEIVED["pushed"] += 1
        _keep_locked(pid, name, _Kept(fds[0], size, serial))


def _keep_locked(pid: int, name: str, kept: _Kept) -> None:
    """Keep ``kept`` under the sender's buffer name, closing the descriptor it takes over."""
    old = _KEPT.pop((pid, name), None)
    _KEPT[(pid, name)] = kept
    if old is not None:
        os.close(old.fd)


def _rebuild_and_keep(pid: int, name: str, serial: int, df: DupFd, size: int) -> torch.UntypedStorage:
    fd = df.detach()
    with _kept_lock:
        RECEIVED["descriptors"] += 1
        new_sender = not any(p == pid for p, _ in _KEPT)
        kept = _Kept(fd, size, serial)
        _keep_locked(pid, name, kept)
        storage = kept.storage()
    if new_sender:
        forget_exited()
    return storage


def _rebuild_named(pid: int, name: str, serial: int) -> torch.UntypedStorage:
    new_sender = False
    with _kept_lock:
        kept = _KEPT.get((pid, name))
        if kept is None or kept.serial != serial:  # pushed, and not read yet
            new_sender = not any(p == pid for p, _ in _KEPT)
            _drain_locked()
            kept = _KEPT.get((pid, name))
        if kept is None or kept.serial != serial:
            raise RuntimeError(
                f"a batch from DataLoader worker (pid {pid}) names its shared buffer {name!r}, which this process "
                "never received: an earlier batch of that worker, which carried the buffer, was dropped before it "
                "was unpickled here. What to do: unpickle a worker's batches in the order it sent them, or turn "
                "buffer reuse off (StreamingNeuralDataset(..., reuse_buffers=False))")
        RECEIVED["by_name"] += 1
        # mapped while the lock is held: forget_exited must not close the descriptor meanwhile
        storage = kept.storage()
    if new_sender:
        forget_exited()
    return storage


def forget_exited() -> int:
    """Close the descriptors kept for worker processes that have exited (the shared memory of
    their buffers is freed once no batch of theirs is left either); returns how many."""
    with _kept_lock:
        _drain_locked()  # pushed by workers whose batches never came
        gone = [key for key in _KEPT if not process_alive(key[0])]
        fds = [_KEPT.pop(key).fd for key in gone]
    for fd in fds:
        os.close(fd)
    return len(fds)


def kept_descriptors() -> int:
    """How many descriptors this process keeps for workers' buffers (diagnostics, tests)."""
    return len(_KEPT)
