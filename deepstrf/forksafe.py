"""Threads that never straddle a fork.

``os.fork()`` copies only the forking thread. Anything another thread was in
the middle of at that instant stays half-done forever in the child: a lock
it held (ours, zarr's, blosc's, MKL's allocator's, torch's RNG mutex) is
held by no one and never released, and the child's first attempt to take it
hangs. DataLoader workers are forked that way on Linux.

deepstrf's own background threads run their work as *gated tasks*
(:func:`run_gated`, :func:`thread_map`). A handler registered with
``os.register_at_fork`` makes every ``os.fork()`` in the process wait until
no gated task is running (new ones wait until the fork is done), so a child
never inherits a deepstrf thread half-way through a read, a decode or a
user's lazy transform. Threads of the user's own (a trainer running torch
BLAS in helper threads) are outside this gate: against those only a start
method that does not fork the trainer helps, which is why
:meth:`~deepstrf.stream.StreamingNeuralDataset.loader` starts its workers
with ``forkserver`` by default (see ``docs/streaming.md``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from types import FrameType
from typing import TypeVar

from .bulk import gc_paused

T = TypeVar("T")
R = TypeVar("R")

# How long a fork waits for running tasks before it goes ahead anyway (with a warning): a task
# stuck on a dead server must not freeze the process that wants to fork.
FORK_WAIT_SECONDS = 60.0


class ForkGate:
    """Counts running gated tasks; a fork waits until none runs, then holds new ones back until
    it is done."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._running = 0
        self._runners: dict[int, int] = {}  # thread ident -> gated tasks it is running
        self._forking = False
        self._mine = threading.local()  # tasks running in this thread (a task may fork, or nest)

    def run(self, fn: Callable[..., R], *args: object) -> R:
        """``fn(*args)``, counted as a running task."""
        cond = self._cond
        with cond:
            while self._forking:
                cond.wait()
            self._running += 1
            me = threading.get_ident()
            self._runners[me] = self._runners.get(me, 0) + 1
        self._mine.depth = getattr(self._mine, "depth", 0) + 1
        try:
            return fn(*args)
        finally:
            # a task that forked and goes on in the child finds the gate reset there: nothing to undo
            self._mine.depth = max(getattr(self._mine, "depth", 1) - 1, 0)
            if cond is self._cond:
                with cond:
                    self._running -= 1
                    if self._runners.get(me, 0) > 1:
                        self._runners[me] -= 1
                    else:
                        self._runners.pop(me, None)
                    cond.notify_all()

    def running(self) -> int:
        """Gated tasks running now (in any thread of this process)."""
        with self._cond:
            return self._running

    def before_fork(self) -> None:
        own = getattr(self._mine, "depth", 0)  # a task that forks cannot wait for itself
        deadline = time.monotonic() + FORK_WAIT_SECONDS
        # New tasks are held back only once none runs: a running task may be waiting for one it
        # submitted (a batch read waits for its stimulus read), which must be able to start.
        with self._cond:
            while self._running > own and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            self._forking = True
            stuck = self._running - own
            runners = [ident for ident in self._runners if ident != threading.get_ident()]
        if stuck:
            warnings.warn(f"forking while {stuck} deepstrf read thread(s) are still busy after "
                          f"{FORK_WAIT_SECONDS:.0f} s; the child may hang on a lock they hold. Start "
                          "DataLoader workers with multiprocessing_context='forkserver' or 'spawn'. Where "
                          f"they are: {where_threads_are(runners)}", RuntimeWarning, stacklevel=2)

    def after_fork_in_parent(self) -> None:
        with self._cond:
            self._forking = False
            self._cond.notify_all()

    def after_fork_in_child(self) -> None:
        self._reset()  # the parent's threads do not exist here; neither do their tasks


def current_frames() -> dict[int, FrameType]:
    """``sys._current_frames()`` with the cyclic collector paused. CPython builds that dict holding
    its lock on the list of threads; a collection run there can call a finalizer that releases
    the GIL (a streaming dataset's, removing its directory), and a thread that takes the GIL and
    then waits for that lock leaves both waiting forever (seen in the test suite)."""
    with gc_paused():
        return sys._current_frames()


def where_threads_are(idents: Iterable[int], frames: int = 4) -> str:
    """The innermost ``frames`` lines of code each of the threads ``idents`` is running now."""
    current = current_frames()
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident in idents:
        if (frame := current.get(ident)) is not None:
            stack = traceback.extract_stack(frame)[-frames:]
            trail = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(stack))
            parts.append(f"thread {names.get(ident, ident)!r}: {trail}")
    return "; ".join(parts) or "unknown"


GATE = ForkGate()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=GATE.before_fork, after_in_parent=GATE.after_fork_in_parent,
                        after_in_child=GATE.after_fork_in_child)


@contextlib.contextmanager
def no_gated_task_running() -> Iterator[None]:
    """Hold gated tasks off while the body runs, as a fork does. For starting helper processes
    (multiprocessing's forkserver, its resource tracker): ``fork_exec`` runs no
    ``os.register_at_fork`` handler, but C libraries' ``pthread_atfork`` ones still run in this
    process, and OpenBLAS's stops its threads under a deepstrf thread inside ``sgemm`` (seen as
    rates of ``inf`` from a synthetic dataset's read)."""
    GATE.before_fork()
    try:
        yield
    finally:
        GATE.after_fork_in_parent()


def run_gated(fn: Callable[..., R], *args: object) -> R:
    """Run ``fn(*args)`` as a task a fork waits for; use it for every job given to a thread."""
    return GATE.run(fn, *args)


def thread_map(fn: Callable[[T], R], items: Iterable[T], max_workers: int, name: str = "deepstrf",
               keep: bool = False) -> list[R]:
    """``list(map(fn, items))`` in gated threads: a short-lived pool, or with ``keep`` the process's
    long-lived pool ``name`` (:func:`kept_pool`; for calls made every batch)."""
    items = list(items)
    if len(items) <= 1 or max_workers <= 1:
        return [fn(x) for x in items]
    # a call from a task of the kept pool itself gets a pool of its own: waiting for tasks queued
    # behind its own in a full pool would never end
    if keep and not threading.current_thread().name.startswith(f"{name}_"):
        return list(kept_pool(name, max_workers).map(lambda x: run_gated(fn, x), items))
    with ThreadPoolExecutor(max_workers=min(max_workers, len(items)), thread_name_prefix=name) as pool:
        return list(pool.map(lambda x: run_gated(fn, x), items))


_KEPT_POOLS: dict[str, tuple[int, ThreadPoolExecutor]] = {}  # name -> (pid, pool)
_kept_pools_lock = threading.Lock()


def kept_pool(name: str, max_workers: int) -> ThreadPoolExecutor:
    """This process's long-lived thread pool ``name`` (made on first use; a forked child makes its
    own). Starting threads for every call costs more than it seems: each start waits for the new
    thread to take the GIL, which a busy DataLoader worker hands over every few ms (measured: 35
    short-lived pools cost a worker 50-70 ms of a 1.2 s epoch, S3 +20 ms, 2 cores)."""
    pid = os.getpid()
    with _kept_pools_lock:
        entry = _KEPT_POOLS.get(name)
        if entry is None or entry[0] != pid:
            entry = _KEPT_POOLS[name] = (pid, ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=name))
        return entry[1]


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` is running: it exists and, where ``/proc`` tells, is not a zombie
    (exited, not yet reaped by its parent, as a DataLoader worker killed mid-fetch stays until
    the main process notices)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:  # no /proc (not Linux), or it exited since
        return True
    return stat[stat.rindex(b")") + 2:][:1] not in (b"Z", b"X")  # the state follows "(command) "


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity, where the system tells)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _new_kept_pools_lock() -> None:
    global _kept_pools_lock
    _kept_pools_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_kept_pools_lock)
