"""DataLoader workers: how they are started, and what each is doing.

Start method. A forked worker is a copy of the trainer taken at one instant:
if another thread of the trainer was inside torch's BLAS (MKL), its RNG or
any other library holding a lock at that instant, the worker's first call
into the same code waits forever. deepstrf's own threads never straddle a
fork (:mod:`deepstrf.forksafe`) and its reading code calls no torch BLAS,
but a user's transform or dataset may. :func:`worker_context` therefore
gives ``forkserver`` where the platform has it (workers are forked from a
small single-threaded server process that never ran the trainer's code),
else ``spawn``. The server imports deepstrf and torch once (preload), so a
new worker starts in tens of milliseconds, not the seconds of ``spawn``.

Activity. Every worker writes what it is reading into a small shared-memory
table (:class:`WorkerActivity`), so the main process can say which worker is
stuck, on which stimuli, for how long, instead of waiting silently.
"""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.forkserver
import os
import time
from collections.abc import Sequence
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess

import torch

from .stats import MAX_SLOTS

# imported once by the forkserver process, so that its workers start with them loaded
PRELOAD = ["deepstrf.stream.dataset"]
# A batch that takes longer than this to arrive from the workers ends the pass with a
# StreamStalledError (``StreamingNeuralDataset.loader(timeout=...)``).
DEFAULT_TIMEOUT_S = 300.0

# columns of the activity table
_PID, _BATCHES, _READING_SINCE_NS, _N_STIMS, _STIMS = 0, 1, 2, 3, 4
_SHOWN_STIMS = 8  # stims of the current read kept for the report


def worker_context() -> BaseContext:
    """The multiprocessing context for DataLoader workers: ``forkserver`` (preloaded with
    deepstrf) where available, else ``spawn``."""
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)  # no effect once this process's server runs
        # start the server now: its imports overlap with the caller's work until the first epoch
        multiprocessing.forkserver.ensure_running()
    return ctx


def start_worker_server() -> None:
    """Start the forkserver now, from a top-level process: its imports (torch, ~1.5 s) then run
    while the caller opens the data and builds its model, instead of before the first batch."""
    if multiprocessing.parent_process() is None and "forkserver" in multiprocessing.get_all_start_methods():
        worker_context()


_FROZEN_IN: int | None = None  # the pid of the process whose objects freeze_long_lived froze


def freeze_long_lived() -> None:
    """In a DataLoader worker, once its dataset is open: move every object alive now (torch and the
    other imports, the opened dataset) out of the cyclic collector's reach, as the ``gc`` docs
    advise for worker processes. Otherwise every full collection walks them again; over a pool of
    10^4 sources, whose reads keep making long-lived objects, each worker paid 0.17 s per full
    collection, one every few thousand items (2 workers: 937-983 -> 1,154-1,458 items/s).
    Once per process: an object frozen is never collected if it later becomes cyclic garbage."""
    global _FROZEN_IN
    if _FROZEN_IN != os.getpid():
        _FROZEN_IN = os.getpid()
        gc.freeze()


def context_method(ctx: str | BaseContext | None) -> str:
    """The start method a DataLoader's ``multiprocessing_context`` argument means."""
    if ctx is None:
        return multiprocessing.get_start_method()
    return ctx if isinstance(ctx, str) else ctx.get_start_method()


class WorkerActivity:
    """What each process slot (0: main process, ``k + 1``: worker ``k``) is reading now,
    in shared memory (inherited by forked workers, passed by handle to others)."""

    def __init__(self) -> None:
        self._table = torch.zeros((MAX_SLOTS, _STIMS + _SHOWN_STIMS), dtype=torch.int64).share_memory_()
        self._slot = 0

    def use_slot(self, slot: int) -> None:
        """Record into row ``slot`` from now on; marks the pass as started by this process."""
        self._slot = slot
        if slot < MAX_SLOTS:
            row = self._table[slot]
            row.zero_()
            row[_PID] = os.getpid()

    def begin(self, stims: Sequence[int]) -> None:
        """A read of ``stims`` starts (one at a time per slot is reported: the latest)."""
        if self._slot >= MAX_SLOTS:
            return
        row = self._table[self._slot]
        shown = list(stims[:_SHOWN_STIMS])
        row[_STIMS:_STIMS + len(shown)] = torch.tensor(shown, dtype=torch.int64)
        row[_N_STIMS] = len(stims)
        row[_READING_SINCE_NS] = time.monotonic_ns()

    def end(self) -> None:
        """The read begun last is done."""
        if self._slot < MAX_SLOTS:
            row = self._table[self._slot]
            row[_BATCHES] += 1
            row[_READING_SINCE_NS] = 0

    def any_worker_started(self, num_workers: int) -> bool:
        """Whether any of the first ``num_workers`` workers has begun its pass (opened the dataset)."""
        return bool((self._table[1:min(num_workers, MAX_SLOTS - 1) + 1, _PID] != 0).any())

    def reset(self) -> None:
        """Forget every slot (a new pass starts new workers)."""
        self._table.zero_()

    def describe(self, num_workers: int, processes: Sequence[BaseProcess] = (), where: str = "") -> str:
        """One line per worker: its pid (and exit code if it died), the batches it delivered, and
        what it reads now, for how long. ``processes``: the DataLoader's worker processes."""
        now = time.monotonic_ns()
        lines = []
        for k in range(num_workers):
            row = self._table[k + 1].tolist() if k + 1 < MAX_SLOTS else None
            proc = processes[k] if k < len(processes) else None
            pid = row[_PID] if row and row[_PID] else (proc.pid if proc is not None else None)
            dead = "" if proc is None or proc.is_alive() else f", dead: exit code {proc.exitcode}"
            head = f"worker {k} (pid {pid or '?'}{dead})"
            if row is None:
                lines.append(f"{head}: not tracked (more than {MAX_SLOTS - 1} workers)")
            elif not row[_PID]:
                lines.append(f"{head}: never started its pass; it is stuck in start-up (before any read), "
                             "e.g. on a lock copied from another thread of the parent at fork")
            elif row[_READING_SINCE_NS]:
                n = row[_N_STIMS]
                stims = row[_STIMS:_STIMS + min(n, _SHOWN_STIMS)]
                more = f" and {n - len(stims)} more" if n > len(stims) else ""
                lines.append(f"{head}: reading stims {stims}{more}{' of ' + where if where else ''} for "
                             f"{(now - row[_READING_SINCE_NS]) / 1e9:.1f} s, after {row[_BATCHES]} batch(es)")
            else:
                lines.append(f"{head}: idle after {row[_BATCHES]} batch(es)")
        return "\n".join(lines)

