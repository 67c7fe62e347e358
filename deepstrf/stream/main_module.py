"""What a worker process would do with the user's ``__main__``, and the start method that follows.

A worker started by ``forkserver`` or ``spawn`` re-imports the file that
``__main__`` came from (as ``__mp_main__``) so that functions and classes
defined there can be unpickled. That is harmless for a script whose work runs
under ``if __name__ == "__main__":``, and fatal for the rest:

- a script that trains at top level (no guard) would run its training again in
  every worker, which multiprocessing stops with its "bootstrapping phase" error;
- a script fed through stdin (``python - < train.py``) has no file to re-import.

:func:`rerun_problem` tells those two apart from the rest (guarded scripts,
``python -m``, ``python -c``, IPython, Jupyter); :mod:`deepstrf.stream.workers`
forks the workers of the former, or starts them under :func:`main_not_rerun`.
Where a worker does not import ``__main__`` (``-c``, notebooks, under
:func:`main_not_rerun`), objects defined in it cannot be found by name there:
:mod:`deepstrf.stream.transfer` sends those by value.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import multiprocessing.spawn
import os
import sys
import threading
from collections.abc import Iterator
from types import FrameType, ModuleType

from ..forksafe import current_frames

GUARD_FIX = ("put the code that builds the data and trains under `if __name__ == \"__main__\":` (a script), "
             "or use num_workers=0")


def rerun_problem() -> str | None:
    """Why re-importing ``__main__`` in a worker would fail or repeat the user's work, or None."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None:
        return None  # -c, IPython, Jupyter: nothing is re-imported
    if not os.path.isfile(path):
        return f"the main script ({path}) is not a file a worker could import (fed through stdin?)"
    guards = _guard_lines(os.path.abspath(path), os.path.getmtime(path))
    line = _main_line(main)
    if line is None:  # the script's top level is not running (a thread after it ended): judge the file
        outside = not guards
    else:
        outside = not any(lo <= line <= hi for lo, hi in guards)
    if outside:
        where = f"line {line} of {path}" if line is not None else path
        return f"the script runs its work at top level ({where}), outside `if __name__ == \"__main__\":`, so " \
               "every worker would run it again"
    return None


_STARTING = threading.local()  # .hides_main: workers started now by this thread do not run __main__ again


@contextlib.contextmanager
def main_not_rerun() -> Iterator[None]:
    """While this thread starts worker processes (forkserver, spawn) for a ``__main__`` that
    :func:`rerun_problem` says they cannot run again: they do not run it (multiprocessing's
    preparation data loses the main script's path), and what they need of it travels by value
    (:func:`workers_import_main`, :mod:`deepstrf.stream.transfer`)."""
    _install_preparation_hook()
    _STARTING.hides_main = rerun_problem() is not None
    try:
        yield
    finally:
        _STARTING.hides_main = False


def workers_import_main() -> bool:
    """Whether a worker started now imports ``__main__``, where objects defined in it are found by
    name: no for ``-c``, IPython and notebooks (no file), nor under :func:`main_not_rerun`."""
    main = sys.modules.get("__main__")
    return getattr(main, "__file__", None) is not None and not getattr(_STARTING, "hides_main", False)


@functools.cache
def _install_preparation_hook() -> None:
    original = multiprocessing.spawn.get_preparation_data

    def preparation_data(name: str) -> dict:
        data = original(name)
        if getattr(_STARTING, "hides_main", False):
            data.pop("init_main_from_path", None)  # a script
            data.pop("init_main_from_name", None)  # a module run with -m
        return data

    multiprocessing.spawn.get_preparation_data = preparation_data


def _main_line(main: ModuleType) -> int | None:
    """The line the main thread's ``__main__`` top-level code is executing now, if it is."""
    if threading.current_thread() is threading.main_thread():
        frame: FrameType | None = sys._getframe()
    else:
        frame = current_frames().get(threading.main_thread().ident)
    namespace = vars(main)
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals is namespace:
            return frame.f_lineno
        frame = frame.f_back
    return None


@functools.lru_cache(maxsize=8)
def _guard_lines(path: str, mtime: float) -> tuple[tuple[int, int], ...]:
    """Line ranges of the top-level ``if __name__ == "__main__":`` blocks of ``path``."""
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, ValueError):
        return ()
    return tuple((node.lineno, node.end_lineno or node.lineno) for node in tree.body
                 if isinstance(node, ast.If) and _is_main_test(node.test))


def _is_main_test(test: ast.expr) -> bool:
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    consts = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return len(names) == 1 and len(consts) == 1
