"""DataLoader workers: how they are started, and what each is doing.

Start method (:func:`worker_context`), chosen per situation:

- ``fork`` when the workers run only deepstrf's own code (a store URL as
  source, no ``worker_init_fn`` or ``collate_fn`` of the user's) and no thread
  of the user's is alive: a forked worker starts in milliseconds with the
  opened store. The only threads then are deepstrf's, which never straddle a
  fork (:mod:`deepstrf.forksafe`), and fsspec's event loop, which fsspec
  resets in the child.
- ``fork`` also when ``__main__`` cannot be re-imported by a worker (a script
  that trains at top level, or one fed through stdin:
  :mod:`deepstrf.stream.main_module`) and no thread of the user's is alive;
  with one alive (a fork can hang in OpenBLAS's fork handler while a thread
  multiplies matrices), or without a safe fork, ``loader()`` starts them by
  ``forkserver`` without running ``__main__`` again
  (:func:`~deepstrf.stream.main_module.main_not_rerun`). Where neither exists,
  it is an error naming the fix, raised before any worker starts.
- ``forkserver`` (else ``spawn``) otherwise: a forked copy of a trainer whose
  other threads hold locks (torch's RNG, BLAS, a user's transform) can hang at
  its first call into the same code, while a forkserver worker is forked from
  a small server that never ran the trainer's code. The server imports
  deepstrf and torch once (preload), so a new worker starts in tens of
  milliseconds, not the seconds of ``spawn``.

Deaths. A worker that dies before the DataLoader's own loop catches its
errors (unpickling its dataset, say) leaves its traceback where
:func:`death_report` finds it (:mod:`deepstrf.stream.worker_boot`); one that
died running the top of ``__main__`` again gets its own fix
(:func:`died_rerunning_main`).

Activity. Every worker writes what it is reading into a small shared-memory
table (:class:`WorkerActivity`), so the main process can say which worker is
stuck, on which stimuli, for how long, instead of waiting silently.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess

import torch

from ..errors import UnsafeMainError
from ..forksafe import no_gated_task_running
from ..tempdirs import process_dir, remove_ended
from .main_module import GUARD_FIX, rerun_problem
from .stats import MAX_SLOTS

# imported once by the forkserver process, so that its workers start with them loaded
# numpy.random: torch's worker loop seeds it in every worker, whose first use imports it (15 ms a worker)
PRELOAD = ["deepstrf.stream.dataset", "deepstrf.stream.worker_boot", "numpy.random"]
# A batch that takes longer than this to arrive from the workers ends the pass with a
# StreamStalledError (``StreamingNeuralDataset.loader(timeout=...)``).
DEFAULT_TIMEOUT_S = 300.0
# Threads a fork may leave behind: deepstrf's (gated), the I/O event loops of fsspec and zarr with
# their executors (those libraries reset them in a forked child), tqdm's monitor of the progress
# bars deepstrf shows (workers draw none), and multiprocessing's queue feeders: a finished
# DataLoader's index queues flush for a moment after its pass, and they only pickle and write to
# pipes that no new worker uses. (Counted as foreign, they made every other epoch start its
# workers through the forkserver: a first-batch stall of seconds when the server was not running.)
# Also IPython's history writer (`ipython script.py`, `%run`): its locks and its SQLite connection
# are used by nothing a worker runs (a worker leaves through os._exit, without IPython's exit hooks).
FORK_SAFE_THREAD_PREFIXES = ("deepstrf", "fsspecIO", "zarr_io", "zarr_pool", "asyncio_", "tqdm_monitor",
                             "QueueFeederThread", "IPythonHistorySavingThread")

# columns of the activity table
_PID, _BATCHES, _READING_SINCE_NS, _N_STIMS, _EARLIER, _OPENING_SINCE_NS, _STIMS = 0, 1, 2, 3, 4, 5, 6
_SHOWN_STIMS = 8  # stims of the current read kept for the report
_TRACEBACK_LINES = 12  # last lines of a dead worker's traceback put in a report


_WARNED_THREADS: set[str] = set()  # threads already named in a warning of this process


def start_method(runs_user_code: bool = True, hides_main: bool = False) -> str:
    """The start method for DataLoader workers now (see module docstring). ``runs_user_code``:
    whether the workers will run code of the user's (a dataset object, a ``worker_init_fn``);
    ``hides_main``: whether the caller starts them under :func:`main_not_rerun` (``loader()``)."""
    methods = multiprocessing.get_all_start_methods()
    can_fork = "fork" in methods and sys.platform.startswith("linux")
    problem = rerun_problem()
    if problem is not None:
        if hides_main and "forkserver" in methods and (foreign_threads() or not can_fork):
            return "forkserver"  # a fork could catch a thread of the user's holding a lock
        if not can_fork:
            raise UnsafeMainError(f"DataLoader workers cannot start here: {problem}, and this platform has no "
                                  f"safe fork. What to do: {GUARD_FIX}.")
        if (threads := foreign_threads()) and not _WARNED_THREADS.issuperset(threads):
            _WARNED_THREADS.update(threads)
            warnings.warn(f"DataLoader workers are forked ({problem}) while threads {threads} of this process "
                          f"run; a worker may hang on a lock one of them holds. To be safe: {GUARD_FIX}.",
                          RuntimeWarning, stacklevel=3)
        return "fork"
    if can_fork and not runs_user_code and not foreign_threads():
        return "fork"
    return "forkserver" if "forkserver" in methods else "spawn"


def foreign_threads() -> list[str]:
    """Names of the live threads of this process other than the main thread and those of
    ``FORK_SAFE_THREAD_PREFIXES``: threads of the user's (or of other libraries) that a fork could
    catch holding a lock."""
    main = threading.main_thread()
    return [t.name for t in threading.enumerate()
            if t is not main and t.is_alive() and not t.name.startswith(FORK_SAFE_THREAD_PREFIXES)]


def worker_context(runs_user_code: bool = True, hides_main: bool = False) -> BaseContext:
    """The multiprocessing context for DataLoader workers started now (:func:`start_method`);
    a forkserver's server is preloaded with deepstrf and started at once."""
    ctx = multiprocessing.get_context(start_method(runs_user_code, hides_main))
    prepare_context(ctx, hides_main)
    return ctx


def prepare_context(ctx: str | BaseContext | None, hides_main: bool = False) -> None:
    """Before workers start with ``ctx`` (a DataLoader's ``multiprocessing_context``): refuse a
    start method that re-imports a ``__main__`` that cannot be re-imported (unless the caller
    starts them under :func:`main_not_rerun`: ``hides_main``), and start a forkserver
    preloaded with deepstrf (else each new worker imports torch itself, ~2 s per worker per epoch);
    before forked workers, import here what every worker imports (:data:`PRELOAD`)."""
    method = context_method(ctx)
    if method == "fork":
        import numpy.random  # noqa: F401  (each forked worker inherits it instead of importing it: PRELOAD)
    if method in ("forkserver", "spawn") and not hides_main and (problem := rerun_problem()) is not None:
        raise UnsafeMainError(f"DataLoader workers started with {method!r} cannot start here: {problem}. "
                              f"What to do: {GUARD_FIX}, or leave multiprocessing_context unset (deepstrf "
                              "forks the workers then).")
    if method == "forkserver":
        multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)  # no effect once it runs
        # start the server (and the resource tracker the workers' queues register with) now: their
        # imports overlap with the caller's work, and no later start can catch a read half-way
        with no_gated_task_running(), _ctrl_c_ignored_by_new_processes():
            multiprocessing.resource_tracker.ensure_running()
            multiprocessing.forkserver.ensure_running()
        _clean_errors_at_exit()


@contextlib.contextmanager
def _ctrl_c_ignored_by_new_processes() -> Iterator[None]:
    """Processes started meanwhile ignore SIGINT from their first instruction: Ctrl-C reaches a
    terminal's whole process group, and the worker server, which ignores it only once its imports
    (seconds: torch) are done, printed its own KeyboardInterrupt traceback beside the script's.
    Its workers then ignore SIGINT too; the main process stops them. (The main thread only: no
    other thread can change a signal's handling.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)


def start_worker_server(runs_user_code: bool = True) -> None:
    """Start the forkserver now if the workers of ``loader()`` would use it, from a top-level
    process: its imports (torch, ~1.5 s) then run while the caller opens the data and builds its
    model, instead of before the first batch."""
    if multiprocessing.parent_process() is None:
        try:
            worker_context(runs_user_code, hides_main=True)  # starts the server only where workers would use it
        except UnsafeMainError:
            pass  # raised where the workers would start


def errors_dir(main_pid: int) -> str:
    """Where forkserver workers of the process ``main_pid`` leave the traceback they died with."""
    return process_dir("worker-errors", main_pid)


def _traceback_of(pid: int | None) -> str | None:
    """The whole traceback a dead worker ``pid`` (of this process) left, if any."""
    if pid is None:
        return None
    try:
        with open(os.path.join(errors_dir(os.getpid()), f"{pid}.txt"), encoding="utf-8") as f:
            return f.read().rstrip()
    except OSError:
        return None


def death_report(pid: int | None) -> str | None:
    """The last lines of the traceback a dead worker ``pid`` (of this process) left, if any."""
    text = _traceback_of(pid)
    return None if text is None else "\n".join(text.splitlines()[-_TRACEBACK_LINES:])


def what_it_raised(pid: int | None) -> str:
    """The last lines of dead worker ``pid``'s traceback, indented, for a report (or where to look)."""
    error = death_report(pid)
    return ("it raised:\n" + "\n".join("    " + x for x in error.splitlines()) if error else
            "what it printed to stderr says why")


def latest_death_since(since_ns: int) -> int | None:
    """The pid of this process's worker that left a traceback last, if it did since ``since_ns``
    (``time.time_ns()``). File times come from a clock that may lag by a few ms: a second of slack."""
    try:
        entries = [(e.stat().st_mtime_ns, e.name) for e in os.scandir(errors_dir(os.getpid()))
                   if e.name.endswith(".txt")]
    except OSError:
        return None
    mtime, name = max(entries, default=(0, ""))
    return int(name[:-4]) if name and mtime >= since_ns - 1_000_000_000 else None


def died_rerunning_main(pid: int | None) -> bool:
    """Whether worker ``pid`` died running the top of ``__main__`` again (as forkserver and spawn
    do in every new process, through multiprocessing's ``_fixup_main_from_path``, or
    ``_fixup_main_from_name`` for ``python -m``)."""
    text = _traceback_of(pid)
    return text is not None and "_fixup_main_from_" in text


# what to do about a worker that died, in general and when the top of __main__ raised in it
DEATH_FIX = ("fix the error the worker raised (above, or in what it printed to stderr); a worker killed by SIGKILL "
             "was most likely stopped by the out-of-memory killer: use fewer workers or a smaller batch_size")
RERUN_FIX = ("the code of your script above `if __name__ == \"__main__\":` runs again in every worker that "
             "forkserver or spawn starts, and it raised there: move it under the guard, or make it safe to run "
             "twice (e.g. multiprocessing.set_start_method(..., force=True))")


_CLEANING = False


def _clean_errors_at_exit() -> None:
    global _CLEANING
    if not _CLEANING:
        _CLEANING = True
        remove_ended("worker-errors")
        atexit.register(shutil.rmtree, errors_dir(os.getpid()), ignore_errors=True)


_FROZEN_IN: int | None = None  # the pid of the process whose objects freeze_long_lived froze


def ignore_interrupts() -> None:
    """In a DataLoader worker: Ctrl-C, which a terminal sends to the whole process group, is the
    main process's to handle (it stops its workers). A forked worker that took it left its loop
    and exited, and its loader's next pass then found it gone (workers of the worker server
    ignore it from their start)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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

    def opening(self, slot: int) -> None:
        """A worker opens the dataset (reads its stores' indexes) before it begins its pass."""
        if slot < MAX_SLOTS:
            self._table[slot, _OPENING_SINCE_NS] = time.monotonic_ns()

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
        """Whether any of the first ``num_workers`` workers has begun this pass (opened the dataset)."""
        rows = self._table[1:min(num_workers, MAX_SLOTS - 1) + 1]
        return bool(((rows[:, _PID] != 0) & (rows[:, _EARLIER] == 0)).any())

    def reset(self) -> None:
        """Forget every slot (a new pass starts new workers)."""
        self._table.zero_()

    def new_pass(self) -> None:
        """Kept workers are asked to begin a new pass: each row stands for the pass before until its
        worker begins this one (a worker still in a read of a pass the consumer left early is
        reported as such, not as stuck in start-up). A worker that began the pass before only after
        this call shows as in this one: what it reads is still right, only that note is missing."""
        self._table[:, _EARLIER] = 1

    def describe(self, num_workers: int, processes: Sequence[BaseProcess] = (), where: str = "") -> str:
        """One line per worker: its pid (and exit code if it died), the batches it delivered, and
        what it reads now, for how long. ``processes``: the DataLoader's worker processes."""
        now = time.monotonic_ns()
        lines = []
        for k in range(num_workers):
            row = self._table[k + 1].tolist() if k + 1 < MAX_SLOTS else None
            proc = processes[k] if k < len(processes) else None
            pid = row[_PID] if row and row[_PID] else (proc.pid if proc is not None else None)
            dead = proc is not None and died(proc)
            head = f"worker {k} (pid {pid or '?'}{f', dead: {exit_status(proc.exitcode)}' if dead else ''})"
            if row is None:
                line = f"{head}: not tracked (more than {MAX_SLOTS - 1} workers)"
            elif not row[_PID] and row[_OPENING_SINCE_NS]:
                opening = "opening the dataset (reading its stores' indexes)"
                line = (f"{head}: died {opening}" if dead else
                        f"{head}: never started its pass: it is {opening} for "
                        f"{(now - row[_OPENING_SINCE_NS]) / 1e9:.1f} s; a store that does not answer stops it there "
                        "(`deepstrf verify URL` names it)")
            elif not row[_PID]:
                line = (f"{head}: died in start-up, before any read" if dead else
                        f"{head}: never started its pass; it is stuck in start-up (before any read), e.g. on a "
                        "lock copied from another thread of the parent at fork")
            elif row[_READING_SINCE_NS]:
                n = row[_N_STIMS]
                stims = row[_STIMS:_STIMS + min(n, _SHOWN_STIMS)]
                more = f" and {n - len(stims)} more" if n > len(stims) else ""
                reading = f"reading stims {stims}{more}{' of ' + where if where else ''}"
                since = f"{(now - row[_READING_SINCE_NS]) / 1e9:.1f} s"
                line = (f"{head}: died {reading}" if dead else f"{head}: {reading} for {since}") + \
                    f", after {row[_BATCHES]} batch(es)"
            else:
                line = f"{head}: {'died' if dead else 'idle'} after {row[_BATCHES]} batch(es)"
            if row is not None and row[_PID] and row[_EARLIER]:
                line += " of the pass before (which the consumer left early); it has not begun this one"
            if dead:
                line += "; " + what_it_raised(proc.pid)
            lines.append(line)
        return "\n".join(lines)


def died(proc: BaseProcess) -> bool:
    """Whether ``proc`` ended other than by finishing its work (exit code 0)."""
    return not proc.is_alive() and proc.exitcode != 0


def exit_status(code: int | None) -> str:
    """How a process ended, from its exit code: ``"killed by SIGKILL"``, ``"exit code 1"``."""
    if code is not None and code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exit code {code}"

