"""Running one function over many inputs: here, in worker processes of this machine, or on a Dask
cluster, with a progress bar fed by task completion.

Batch work (``deepstrf import-nwb``, ``deepstrf verify``) is written once as a function of one
input; :func:`run_tasks` runs it serially, in ``jobs`` local processes (forkserver, else spawn),
or as one Dask task per input on a ``dask.distributed.Client``. A task that raises (a worker
killed, a bug) becomes the caller's ``failed(task, error)`` result: one input never stops the
others (in ``jobs`` processes, the tasks running when a worker died are run again, each alone,
and only one whose worker dies alone too fails). An interrupt (Ctrl-C) of a ``jobs`` run drops
the tasks not yet started and ends the workers at once. :func:`dask_client` turns a ``--dask``
address into a client: ``local:N`` starts a ``LocalCluster`` of N single-threaded worker
processes on this machine, anything else is the address of a running scheduler (e.g. one
started by ``dask-jobqueue`` on SLURM).
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from concurrent.futures import as_completed as completed_locally
from functools import partial
from typing import Any, TypeVar

from tqdm.auto import tqdm

from .errors import ClusterError
from .forksafe import run_gated

R = TypeVar("R")
LOCAL_PREFIX = "local:"
INSTALL_HINT = "install the dask extra: pip install 'deepstrf-pool[dask]'"


def run_tasks(func: Callable[..., R], tasks: Sequence[tuple], *, failed: Callable[[tuple, BaseException], R],
              jobs: int = 1, threads: int = 1, client: Any = None, desc: str = "tasks", unit: str = "task",
              progress: bool | None = None) -> list[R]:
    """``[func(*t) for t in tasks]``, in input order, run by one engine: ``client`` (a
    ``dask.distributed.Client``: one task per input), else ``jobs`` local worker processes, else
    ``threads`` threads of this process (tasks that mostly wait on storage), else this thread.
    ``func`` must be importable by name where it runs (a module-level function)."""
    results: dict[int, R] = {}
    bar = tqdm(total=len(tasks), desc=desc, unit=unit, disable=progress is False, dynamic_ncols=True)
    try:
        if client is not None:
            _run_on_dask(client, func, tasks, failed, results, bar)
        elif jobs > 1 and len(tasks) > 1:
            _run_in_processes(func, tasks, failed, results, bar, jobs)
        elif threads > 1 and len(tasks) > 1:
            with ThreadPoolExecutor(max_workers=min(threads, len(tasks)), thread_name_prefix=desc) as pool:
                _run_locally(pool, partial(run_gated, func), tasks, failed, results, bar)
        else:
            for i, t in enumerate(tasks):
                try:
                    results[i] = func(*t)
                except Exception as e:  # noqa: BLE001 - reported as this input's result, like a remote failure
                    results[i] = failed(t, e)
                bar.update(1)
    finally:
        bar.close()
    return [results[i] for i in range(len(tasks))]


def _run_locally(pool: Executor, func: Callable, tasks: Sequence[tuple], failed: Callable, results: dict,
                 bar: tqdm) -> None:
    index = {pool.submit(func, *t): i for i, t in enumerate(tasks)}
    for f in completed_locally(index):
        results[index[f]] = _outcome(f, tasks[index[f]], failed)
        bar.update(1)


def _run_in_processes(func: Callable, tasks: Sequence[tuple], failed: Callable, results: dict, bar: tqdm,
                      jobs: int) -> None:
    """Run ``tasks`` in ``jobs`` local worker processes. A worker that dies (the out-of-memory
    killer, a crash in a library) breaks its pool: the tasks then running go on in a new pool, each
    alone, and one whose worker dies alone too is reported failed; the others are unaffected."""
    from .stream.workers import DEATH_FIX

    todo = deque(range(len(tasks)))
    suspects: deque[int] = deque()
    while todo:
        suspects.extend(_run_pool(func, tasks, todo, jobs, results, failed, bar)[0])
    while suspects:
        lost, how = _run_pool(func, tasks, suspects, 1, results, failed, bar)
        for i in lost:
            results[i] = failed(tasks[i], BrokenProcessPool(
                f"its worker process died ({how}) while it ran, also when it ran alone: {DEATH_FIX}"))
            bar.update(1)


def _run_pool(func: Callable, tasks: Sequence[tuple], todo: deque[int], workers: int, results: dict,
              failed: Callable, bar: tqdm) -> tuple[list[int], str]:
    """Run the tasks of ``todo`` (taken from its front) in a pool of ``workers`` processes, no more
    at once than there are workers, so that a worker's death can be only one of those running.
    Returns, where a worker died, the tasks that were running (the pool is then broken) and how the
    dead worker ended; ``([], "")`` once ``todo`` is empty. On an interrupt (Ctrl-C) the workers are
    ended at once (:func:`_stop`) and the queued tasks dropped."""
    from .stream.workers import worker_context

    pool = ProcessPoolExecutor(max_workers=workers, mp_context=worker_context(), initializer=_exit_on_sigterm)
    running: dict[Future, int] = {}
    processes: dict[int, Any] = {}
    try:
        while todo or running:
            while todo and len(running) < workers:
                i = todo.popleft()
                running[pool.submit(func, *tasks[i])] = i
                processes.update(getattr(pool, "_processes", None) or {})
            for f in wait(running, return_when=FIRST_COMPLETED).done:
                if isinstance(f.exception(), BrokenProcessPool):
                    wait(running)  # a broken pool fails all its futures at once
                    pool.shutdown()
                    return list(running.values()), _how_it_ended(processes.values())
                i = running.pop(f)
                results[i] = _outcome(f, tasks[i], failed)
                bar.update(1)
    except BaseException:
        _stop(pool)
        raise
    pool.shutdown()
    return [], ""


def _how_it_ended(processes: Iterable[Any]) -> str:
    """How the worker that broke a pool ended ("killed by SIGKILL", "exit code 9"), as far as known."""
    from .stream.workers import died, exit_status

    for p in processes:
        p.join(timeout=5)
    return ", ".join(sorted({exit_status(p.exitcode) for p in processes if died(p)})) or "how is unknown"


def _exit_on_sigterm() -> None:
    """In a worker: end at SIGTERM (sent by :func:`_stop`) through multiprocessing's exit
    handlers, which release the named semaphores the task's libraries made (tqdm's and blosc's
    locks); a plain SIGTERM left them to the resource tracker, which warned of leaks at exit."""
    import signal

    def leave(signum: int, frame: Any) -> None:
        from multiprocessing import util

        util._exit_function()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, leave)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel ``pool``'s queued tasks and end its worker processes now (they ignore SIGINT: a
    terminal's Ctrl-C is the main process's to handle)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # shutdown() forgets them
    manager = getattr(pool, "_executor_manager_thread", None)
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        p.terminate()
    for p in processes:
        p.join(timeout=5)
        if p.is_alive():  # stuck in its exit handlers (a lock its interrupted task held)
            p.kill()
            p.join(timeout=5)
    if manager is not None:  # it releases the pool's queues once it sees the workers gone
        manager.join(timeout=5)


def _run_on_dask(client: Any, func: Callable, tasks: Sequence[tuple], failed: Callable, results: dict,
                 bar: tqdm) -> None:
    from distributed import as_completed

    if not tasks:
        return
    futures = client.map(func, *zip(*tasks), pure=False)
    index = {f.key: i for i, f in enumerate(futures)}
    done = as_completed(futures)
    del futures  # a result is dropped from the cluster once taken: nothing else holds its future
    for f in done:
        i = index[f.key]
        results[i] = _outcome(f, tasks[i], failed)
        bar.update(1)


def _outcome(future: Any, task: tuple, failed: Callable) -> Any:
    try:
        return future.result()
    except Exception as e:  # noqa: BLE001 - a killed worker or an unexpected error: this input's failure
        return failed(task, e)


def local_workers(address: str) -> int | None:
    """The N of a ``local:N`` address, None for a scheduler's address; a ``ValueError`` saying what
    is expected where the address is empty or N is no whole number of at least 1."""
    n = address[len(LOCAL_PREFIX):] if address.startswith(LOCAL_PREFIX) else None
    if not address.strip() or (n is not None and (not n.isdigit() or int(n) < 1)):
        raise ValueError("expected local:N with N >= 1 worker processes (e.g. local:4), or a scheduler address "
                         f"such as tcp://host:8786, got {address!r}")
    return None if n is None else int(n)


@contextlib.contextmanager
def dask_client(address: str, *, timeout: str = "30s") -> Iterator[Any]:
    """A ``dask.distributed.Client`` for ``address``: ``local:N`` (a ``LocalCluster`` of N
    single-threaded worker processes, closed on exit) or a scheduler address (``tcp://host:8786``,
    reached within ``timeout``)."""
    try:
        n = local_workers(address)
    except ValueError as e:
        raise ClusterError(f"--dask {address}: {e}.") from e
    try:
        from distributed import Client, LocalCluster
    except ImportError as e:
        raise ClusterError(f"--dask {address}: dask.distributed is not installed; {INSTALL_HINT}.") from e
    if n is not None:
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                          dashboard_address=":0") as cluster, Client(cluster) as client:
            yield client
        return
    try:
        client = Client(address, timeout=timeout)
    except (OSError, ValueError) as e:
        raise ClusterError(f"--dask {address}: cannot reach a Dask scheduler there ({type(e).__name__}: {e}). "
                           "Check the address (tcp://host:port) and that the scheduler runs, or use local:N.") from e
    with client:
        yield client
