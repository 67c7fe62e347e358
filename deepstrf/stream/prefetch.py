"""Bounded read-ahead: run a function over tasks in background threads, in order.

At most ``depth`` results are read ahead at any time (running, or finished
and waiting), plus the one the consumer holds, so memory is bounded by
``depth + 1`` batches whatever the size of the dataset. Each read is a gated
task (:mod:`deepstrf.forksafe`): a fork never copies one half-way.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from ..forksafe import run_gated

T = TypeVar("T")
R = TypeVar("R")


class ReadTimeout(TimeoutError):
    """A read took longer than its timeout; ``task`` is what it was given."""

    def __init__(self, task: object, timeout: float) -> None:
        super().__init__(f"a read took longer than {timeout:g} s")
        self.task = task


class Prefetcher:
    """Ordered, bounded ``map(fn, tasks)`` over a small thread pool.

    ``max_outstanding`` records the largest number of results read ahead at
    once (for tests and diagnostics); it never exceeds ``depth``.
    """

    def __init__(self, fn: Callable[[T], R], depth: int = 4, threads: int = 2) -> None:
        if depth < 1 or threads < 1:
            raise ValueError(f"prefetch depth and threads must be >= 1, got {depth}, {threads}")
        self.fn = fn
        self.depth = depth
        self.threads = threads
        self.max_outstanding = 0

    def map(self, tasks: Iterable[T], timeout: float | None = None) -> Iterator[R]:
        """Yield ``fn(task)`` for each task, in order, reading up to ``depth`` ahead.

        ``timeout``: a result that takes longer raises :class:`ReadTimeout`; the read that is stuck
        is left to finish in its thread (a thread cannot be stopped)."""
        pending: deque[tuple[T, Future]] = deque()
        pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="deepstrf-prefetch")
        stuck = False

        def oldest() -> R:
            nonlocal stuck
            task, future = pending.popleft()
            try:
                return future.result(timeout)
            except TimeoutError:
                stuck = True
                raise ReadTimeout(task, timeout) from None

        try:
            for task in tasks:
                while len(pending) >= self.depth:
                    yield oldest()
                pending.append((task, pool.submit(run_gated, self.fn, task)))
                self.max_outstanding = max(self.max_outstanding, len(pending))
            while pending:
                yield oldest()
        finally:
            for _, f in pending:
                f.cancel()
            pool.shutdown(wait=not stuck, cancel_futures=True)
