"""Imported by the forkserver's server process only (``workers.PRELOAD``), never by user code.

A worker forked from the server that dies before the DataLoader's own loop
catches its errors (while unpickling its dataset, say) reports the exception
through ``sys.excepthook``. The hook installed here also writes the traceback
to a file named after the worker's pid, in the directory of the process that
started the server, so that the main process can put the worker's own error
into its report (:func:`deepstrf.stream.workers.death_report`).
"""

from __future__ import annotations

import os
import sys
import traceback

from .workers import errors_dir

_STARTED_BY = os.getppid()  # the server's parent: the process whose workers these are
_print_exception = sys.excepthook


def _record(exc_type: type[BaseException], exc: BaseException, tb: object) -> None:
    try:
        folder = errors_dir(_STARTED_BY)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{os.getpid()}.txt"), "w", encoding="utf-8") as f:
            f.write("".join(traceback.format_exception(exc_type, exc, tb)))
    except OSError:
        pass
    _print_exception(exc_type, exc, tb)


sys.excepthook = _record
