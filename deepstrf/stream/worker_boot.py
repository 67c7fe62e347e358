"""Imported by the forkserver's server process only (``workers.PRELOAD``), never by user code.

A worker forked from the server that dies before the DataLoader's own loop
catches its errors (while unpickling its dataset, say) reports the exception
through ``sys.excepthook``. The hook installed here also writes the traceback
to a file named after the worker's pid, in the directory of the process that
started the server, so that the main process can put the worker's own error
into its report (:func:`deepstrf.stream.workers.death_report`). It records and
prints nothing for a worker whose start-up data the main process stopped sending
because it was exiting (Ctrl-C).
"""

from __future__ import annotations

import os
import pickle
import sys
import traceback

from .workers import errors_dir

_STARTED_BY = os.getppid()  # the server's parent: the process whose workers these are
_print_exception = sys.excepthook


def _start_up_data_gone(exc: BaseException, tb: object) -> bool:
    """Whether the worker failed to read what the main process sends it to start with (its process
    object and dataset: multiprocessing's ``spawn._main``) because the main process stopped
    sending it (the data ends early) or, exiting, removed what it refers to (a semaphore)."""
    frames = [frame.f_code for frame, _ in traceback.walk_tb(tb)]
    if not any(code.co_name == "_main" and code.co_filename.endswith("spawn.py") for code in frames):
        return False
    cut_short = isinstance(exc, EOFError) or (isinstance(exc, pickle.UnpicklingError) and "truncated" in str(exc))
    removed = isinstance(exc, FileNotFoundError) and frames[-1].co_filename.endswith("synchronize.py")
    return cut_short or removed


def _record(exc_type: type[BaseException], exc: BaseException, tb: object) -> None:
    if _start_up_data_gone(exc, tb):  # the main process is exiting (Ctrl-C, say): nobody is left to read
        return  # this, which would only be printed beside the user's own error
    try:
        folder = errors_dir(_STARTED_BY)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{os.getpid()}.txt"), "w", encoding="utf-8") as f:
            f.write("".join(traceback.format_exception(exc_type, exc, tb)))
    except OSError:
        pass
    _print_exception(exc_type, exc, tb)


sys.excepthook = _record
