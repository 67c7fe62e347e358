"""``StreamingDataLoader``: the ``DataLoader`` that :meth:`StreamingNeuralDataset.loader` returns.

It owns what happens around a pass with worker processes: the start method
chosen for them (:mod:`~deepstrf.stream.workers`), the main process reading a
pass's first batches while they start (:mod:`~deepstrf.stream.lead`), the
count of batches handed out (exact ``state_dict`` with workers), and the
report of a worker that died or stalled. What a pass reads, and in what order,
stays with the dataset (:mod:`~deepstrf.stream.dataset`).
"""

from __future__ import annotations

import atexit
import threading
import time
import warnings
import weakref
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader
from torch.utils.data._utils import signal_handling

from ..errors import StreamStalledError
from . import handover
from .prefetch import ReadTimeout
from .main_module import main_not_rerun
from .transfer import UserCallable, share_before_sending
from .workers import (DEATH_FIX, DEFAULT_TIMEOUT_S, RERUN_FIX, context_method, died,
                      died_rerunning_main, foreign_threads, latest_death_since, prepare_context, what_it_raised,
                      worker_context)

if TYPE_CHECKING:
    from .dataset import StreamingNeuralDataset

DEATH_WAIT_S = 5.0  # how long a batch that failed to unpickle waits to see its worker dead
# DataLoader prefetch_factor of loader() for dense batches (torch's default, 2, for compact ones)
DENSE_PREFETCH_FACTOR = 1
_STARTED_POLL_S = 0.002  # how often the thread starting the workers looks for one that began its pass
# how long the DataLoader waits for a batch before loader() looks at its workers again: a worker that
# died is reported within this time, not at the end of ``timeout``
WORKER_CHECK_S = 1.0
# what to do about a pass that got no batch for its timeout
STALL_FIX = ("look for a read that never returns (a dead server, a lock in your transform), or raise "
             "loader(timeout=...) if reads are just slow")


def _any_dead(workers: Sequence[Any], wait_s: float) -> bool:
    """True once any of ``workers`` is seen dead, within ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    while not any(map(died, workers)):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _patient_get_data(iterator: Any, timeout_s: float) -> Any:
    """A ``_get_data`` for torch's iterator while kept workers acknowledge a new pass: torch's
    ``_reset`` first drains what they still had in flight from a pass the consumer left early,
    which can take longer than the DataLoader's short check ``timeout``. This one waits up to
    ``timeout_s`` for each item, and sees a dead worker within ``WORKER_CHECK_S``."""
    def get_data() -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            received, data = iterator._try_get_data(WORKER_CHECK_S)  # raises for a dead worker
            if received:
                return data
            if iterator._shutdown:  # stopped meanwhile (at interpreter exit, say)
                raise RuntimeError("DataLoader workers stopped while they were beginning a pass")
            if time.monotonic() >= deadline:
                raise RuntimeError(f"DataLoader timed out after {timeout_s:g} seconds")
    return get_data


def _in_daemon_thread(fn: Any, *args: Any) -> Future:
    """``fn(*args)`` in a daemon thread: a consumer that leaves a pass (Ctrl-C included) does not
    wait for it, nor does the interpreter's exit."""
    future: Future = Future()

    def run() -> None:
        future.set_running_or_notify_cancel()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # handed to whoever awaits the future
            future.set_exception(exc)

    threading.Thread(target=run, name="deepstrf-start-workers", daemon=True).start()
    return future


class _Pass:
    """An iterator over one pass of a :class:`StreamingDataLoader`, ended early by the loader's
    next pass (see :meth:`StreamingDataLoader.__iter__`)."""

    def __init__(self, batches: Generator[Any, None, None]) -> None:
        self._batches = batches
        self._ended = False

    def __iter__(self) -> "_Pass":
        return self

    def __next__(self) -> Any:
        if self._ended:
            raise RuntimeError(
                "this pass of the StreamingDataLoader ended when a new pass of it began (iter(loader) again; "
                "e.g. the same loader given for training and validation): a loader runs one pass at a time. "
                "Use a loader per pass you run at the same time, each over its own StreamingNeuralDataset")
        return next(self._batches)

    def close(self) -> None:
        self._batches.close()

    def end(self) -> None:
        self._ended = True
        self._batches.close()


def _start_context(dataset: "StreamingNeuralDataset", given: Any, worker_init_fn: Any, collate_fn: Any) -> Any:
    """The ``multiprocessing_context`` of workers starting now: ``given`` (checked, and a forkserver
    prepared), else the rule's choice, by whether the workers would run code of the user's (a
    dataset object, a ``worker_init_fn``, a ``collate_fn``)."""
    if given is not None:
        prepare_context(given, hides_main=True)
        return given
    return worker_context(dataset._source is not None or worker_init_fn is not None or collate_fn is not None,
                          hides_main=True)


_PERSISTENT: weakref.WeakSet = weakref.WeakSet()  # loaders whose workers may outlive a pass


def _stop_at_exit(loader: "StreamingDataLoader") -> None:
    # registered (again: unregister first) after multiprocessing's own exit handler, so that it runs
    # before it (last in, first out)
    atexit.unregister(_stop_persistent_workers)
    atexit.register(_stop_persistent_workers)
    _PERSISTENT.add(loader)


def _stop_persistent_workers() -> None:
    """At interpreter exit, stop the persistent workers of live loaders the normal way (they leave
    their loop and run their own exit handlers) before multiprocessing kills the daemonic children
    that are left. A killed worker never unregisters what it registered with multiprocessing's
    resource tracker: numcodecs' blosc makes one named semaphore per process that decodes, so two
    spawned or forkserver workers used to be reported as "2 leaked semaphore objects" at exit."""
    for loader in list(_PERSISTENT):
        loader._stop_workers(loader._iterator)
    _PERSISTENT.clear()


class StreamingDataLoader(DataLoader):
    """``DataLoader(batch_size=None)`` over a :class:`StreamingNeuralDataset`.

    - It counts the batches it hands out, so ``state_dict()`` is exact with worker processes.
    - Worker processes start by the rule of :func:`~deepstrf.stream.workers.start_method` unless
      ``multiprocessing_context`` is given, chosen again at every start: forked when they run
      only deepstrf's code and no thread of yours is alive, or when ``__main__`` cannot be
      re-imported (a script without ``if __name__ == "__main__":``, or fed through stdin);
      ``forkserver`` (``spawn`` where there is none) otherwise. Where no method can work, the
      loader raises at once, naming the fix.
    - ``timeout`` (default 300 s with workers): when no batch arrives for that long the pass ends
      with :class:`~deepstrf.errors.StreamStalledError` naming every worker, what it was reading
      and for how long, and the workers are stopped. A worker that dies is reported within
      about a second, with the exception it raised where it left one.
    - ``read_while_starting``: until the first worker begins the pass (workers that are not
      forked take seconds to start: the worker server's ``import torch``, each worker opening the
      dataset), the main process reads the pass's first batches itself; the batches come in the
      same order (:mod:`deepstrf.stream.lead`). ``lead_batches`` is how many it read in the last
      pass. Default: on, except for dense batches, where the main process's batches (hundreds of
      MB each) would add to the workers' at the hand-over (measured: peak 2.6 -> 3.7 GB), and for
      stores over a network, whose reads in the main process wait on round trips that the workers'
      first batches then wait behind (measured over S3: 12-18 % slower over 400 items, first batch
      no sooner). Forked workers start at once: no lead.
    - ``pin_memory``: default True only for a dataset with a CUDA ``device`` and workers (the
      workers then send compact batches, tens of MB, whose copy to the GPU can run beside the
      step); pinning dense host batches (hundreds of MB) is warned against.
    - ``persistent_workers``: default True with workers. A new worker maps and zeroes its batch
      buffers again, starts its storage clients and shard caches empty and, with a CUDA
      ``device``, forks a process that holds a CUDA context. Kept workers are restarted when a
      setting of the dataset they read (its shuffle, seed, batch size...) changed since they
      started; the epoch and the resume position they follow as they are. Pass
      ``persistent_workers=False`` for a loader you run rarely: kept workers hold their buffers
      between epochs.
    """

    def __init__(self, dataset: StreamingNeuralDataset, *, read_while_starting: bool | None = None,
                 **kwargs: Any) -> None:
        workers = kwargs.get("num_workers", 0)
        if dataset.batch_size is None and workers > 0:
            raise ValueError("StreamingNeuralDataset.loader with worker processes needs the dataset to "
                             "build batches: pass batch_size to StreamingNeuralDataset, or batch its items with "
                             "DataLoader(ds, batch_size=B, collate_fn=compact_collate, num_workers=k) (and "
                             "loader_batch_size=B on the dataset; call ds.set_epoch every epoch)")
        kwargs.setdefault("batch_size", None)
        on_cuda = dataset.device is not None and dataset.device.type == "cuda"
        dense = dataset.built_format == "dense" and dataset.batch_size is not None  # hundreds of MB each
        on_network = dataset._waits_on_network()
        # with a CUDA device only compact batches cross from the workers: pinned, their copy to the
        # device runs beside the training step; a dense host batch (hundreds of MB) is never pinned
        kwargs.setdefault("pin_memory", on_cuda and workers > 0)
        # kept across epochs: new workers cost the most of any epoch's start (AA1+AA2 pool, 2 workers,
        # later epochs with new workers against kept: local compact 215-266 against 323-385 items/s,
        # dense 73-80 against 150-172; S3 +20 ms 0.75 of local against 0.9-1.0; forking a process
        # that holds a CUDA context ~20 ms per worker on an H200)
        kwargs.setdefault("persistent_workers", workers > 0)
        if kwargs["pin_memory"] and dense:
            warnings.warn("pin_memory=True copies every dense batch (hundreds of MB on a pool) into page-locked "
                          "memory, which costs more than it saves; pass device='cuda' to the "
                          "StreamingNeuralDataset instead: the workers then send compact batches and the dense "
                          "batch is built on the GPU", UserWarning, stacklevel=3)
        self.stall_timeout: float = kwargs.get("timeout") or (DEFAULT_TIMEOUT_S if workers > 0 else 0.0)
        if workers == 0:  # torch refuses a timeout without workers: it bounds the reads of this process
            kwargs["timeout"] = 0
        self._given_context = kwargs.get("multiprocessing_context")
        self._user_collate = kwargs.get("collate_fn")
        for name in ("worker_init_fn", "collate_fn"):  # found by name, or sent by value (transfer.py)
            if kwargs.get(name) is not None:
                kwargs[name] = UserCallable(kwargs[name])
        if workers > 0:
            # the DataLoader only waits this long at a time, so that dead workers are seen at once
            kwargs["timeout"] = min(self.stall_timeout, WORKER_CHECK_S)
            if dense:  # one batch per worker in flight, not two
                kwargs.setdefault("prefetch_factor", DENSE_PREFETCH_FACTOR)
            kwargs["multiprocessing_context"] = _start_context(
                dataset, self._given_context, kwargs.get("worker_init_fn"), self._user_collate)
        super().__init__(dataset, **kwargs)
        self.read_while_starting = not dense and not on_network if read_while_starting is None else read_while_starting
        self.lead_batches = 0
        self._workers_settings: str | None = None  # the dataset's settings when the workers started
        self._open_pass: weakref.ref[_Pass] | None = None
        # the start of a pass left during its lead, still running, and whether it starts new workers
        self._starting: tuple[Future, bool] | None = None
        if self.persistent_workers:
            _stop_at_exit(self)

    def _refresh_length(self) -> None:
        """torch warns when a pass yields more batches than ``len(loader)`` said the last time it was
        asked; a pass after a resumed one is a whole epoch again."""
        if self._IterableDataset_len_called is not None:
            self._IterableDataset_len_called = len(self.dataset)

    def __iter__(self) -> Iterator[Any]:
        """A new pass. A loader runs one pass at a time (kept workers serve one): this one ends a
        pass still open, whose iterator then raises if it is used again."""
        earlier = self._open_pass() if self._open_pass is not None else None
        if earlier is not None:
            earlier.end()
        current = _Pass(self._pass())
        self._open_pass = weakref.ref(current)
        return current

    def _pass(self) -> Iterator[Any]:
        ds: StreamingNeuralDataset = self.dataset
        ds._end_delivered_pass()
        self._refresh_length()
        if self.num_workers == 0:  # the dataset's own pass, in this process
            yield from self._in_process()
            return
        self._await_earlier_start()
        settings = ds._worker_settings()
        if self._iterator is not None and (settings != self._workers_settings or self._lost_a_worker()):
            # kept workers hold a copy of the dataset as it was; one that died (killed while the
            # consumer trained, say) may have left half a batch in the pipe its sibling still holds
            # open: draining that would wait forever
            self._stop_workers(self._iterator)
        if self._iterator is None or not self.persistent_workers:  # workers start in this pass: threads
            # may have come or gone since the last start
            self.multiprocessing_context = _start_context(ds, self._given_context, self.worker_init_fn,
                                                          self._user_collate)
            self._workers_settings = settings
            ds.activity.reset()
        else:
            ds.activity.new_pass()
        ds._begin_pass()
        self.lead_batches = 0
        try:
            if self.read_while_starting and context_method(self.multiprocessing_context) != "fork":
                batches = yield from self._read_while_starting()
            else:
                ds._lead.reset()
                batches = self._dataloader_iter()
            yield from self._from_workers(batches)
        finally:
            ds._lead.reset()  # workers of any later DataLoader read their whole share

    def _in_process(self) -> Iterator[Any]:
        """The dataset's own pass, in this process, each read bounded by ``timeout`` where one was given."""
        ds: StreamingNeuralDataset = self.dataset
        ds._read_timeout = self.stall_timeout or None
        try:
            yield from super().__iter__()
        except ReadTimeout as exc:
            raise StreamStalledError(
                f"streaming {ds._where()}: a read of stims {ds._state().visible[exc.task].tolist()} took longer than "
                f"{self.stall_timeout:g} s (loader timeout). Epoch {ds.epoch}, pass stopped. What to do: "
                f"{STALL_FIX}.") from exc
        finally:
            ds._read_timeout = None

    def _read_while_starting(self) -> Generator[Any, None, Any]:
        """Yield the pass's first batches, read here while a thread starts the workers (or has
        persistent ones begin a new pass); returns the DataLoader's iterator over the rest
        (:mod:`deepstrf.stream.lead`)."""
        ds: StreamingNeuralDataset = self.dataset
        ds._state()  # opened here before the thread pickles the dataset for the workers
        if self._iterator is None or not self.persistent_workers:
            share_before_sending(ds._source)  # not while this thread reads it (transfer.py)
        ds._lead.open()
        # torch installs its handler for dead workers from the main thread only
        signal_handling._set_SIGCHLD_handler()
        # new workers' base seed is drawn here, as a plain DataLoader's is: the thread must not take
        # it from the global generator at a moment that depends on the consumer's own draws
        generator = self.generator
        if generator is None and (self._iterator is None or not self.persistent_workers):
            generator = torch.Generator().manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        device = torch.accelerator.current_device_index() if self.pin_memory and torch.accelerator.is_available() \
            else None
        starting = _in_daemon_thread(self._start_workers, generator, device)
        self._starting = starting, self._iterator is None or not self.persistent_workers
        try:
            for batch in ds._lead_batches(self.stall_timeout or None):
                self.lead_batches += 1
                ds._steps += 1
                # your collate_fn, as a worker applies it to the batches it reads
                yield ds.deliver(batch if self._user_collate is None else self._user_collate(batch))
                if starting.done() and starting.exception() is not None:
                    break
        except ReadTimeout as exc:
            ds._lead.close()
            self._stop_workers(starting.result())
            stims = ds._state().visible[exc.task].tolist()
            raise StreamStalledError(
                f"streaming {ds._where()}: the main process waited {self.stall_timeout:g} s for its read of stims "
                f"{stims} (it reads a pass's first batches while its workers start). "
                f"Epoch {ds.epoch}, pass stopped. What to do: {STALL_FIX}; "
                "loader(read_while_starting=False) leaves every read to the workers.") from exc
        finally:  # leaving early (break, Ctrl-C, an error): the start goes on; the next pass awaits it
            ds._lead.close()
        self._starting = None
        return starting.result()

    def _await_earlier_start(self) -> None:
        """Before a pass touches the workers: let the start of a pass the consumer left during its
        lead end (kept workers may still be finishing a pass before it). One that failed has no
        one left to report to: its workers are stopped, and this pass starts new ones. So are new
        workers that pass started: they may not have begun it yet, and would take this pass's
        lead count for theirs (the main process then read this whole pass itself)."""
        if self._starting is None:
            return
        (starting, new_workers), self._starting = self._starting, None
        if starting.exception() is not None or new_workers:  # exception() waits for the start to end
            self._stop_workers(self._iterator)

    def _start_workers(self, generator: torch.Generator | None, device: int | None) -> Iterator[Any]:
        """Start the workers, or have persistent ones begin a new pass (a thread: a start waits for
        the worker server, a new pass for the workers to finish the last); close the lead as soon as
        one of them begins its pass."""
        ds: StreamingNeuralDataset = self.dataset
        if device is not None:  # the pin-memory thread pins for the current device of the thread starting it
            torch.accelerator.set_device_index(device)
        own, self.generator = self.generator, generator
        try:
            batches = self._dataloader_iter()
        finally:
            self.generator = own
        workers = getattr(batches, "_workers", [])
        # a worker that died starting (a select callable that fails there, say) is reported by the
        # DataLoader: the main process stops reading on its own then
        while not (ds._lead.is_closed() or ds.activity.any_worker_started(self.num_workers)
                   or any(map(died, workers))):
            time.sleep(_STARTED_POLL_S)
        ds._lead.close()
        return batches

    def _dataloader_iter(self) -> Iterator[Any]:
        """``DataLoader.__iter__``: starts the workers, or has kept ones begin a pass. A worker that
        dies before it has read its dataset (the top of ``__main__``, run again by forkserver,
        raised) leaves the main process a broken pipe: reported with the worker's own error. Kept
        workers get ``stall_timeout`` to begin the pass (they first finish the reads of a pass
        the consumer left early)."""
        started_ns = time.time_ns()
        kept = self._iterator if self.persistent_workers else None
        try:
            if kept is None:
                with main_not_rerun():  # an unguarded script's workers do not run it again
                    return super().__iter__()
            kept._get_data = _patient_get_data(kept, self.stall_timeout)
            try:
                return super().__iter__()
            finally:
                del kept._get_data
        except (BrokenPipeError, ConnectionResetError, EOFError) as exc:
            raise self._start_failed(exc, started_ns) from exc
        except RuntimeError as exc:  # kept workers that died, or stalled, before they began the pass
            if kept is None:
                raise
            raise self._stalled(kept, exc) from exc

    def _start_failed(self, exc: BaseException, started_ns: int) -> StreamStalledError:
        ds: StreamingNeuralDataset = self.dataset
        dead = latest_death_since(started_ns)
        hint = RERUN_FIX if died_rerunning_main(dead) else DEATH_FIX
        return StreamStalledError(
            f"streaming {ds._where()}: a DataLoader worker died as it started, before it had its dataset (the main "
            f"process got {type(exc).__name__} sending it). Epoch {ds.epoch}, pass stopped; {what_it_raised(dead)}"
            f"\nWhat to do: {hint}.")

    def _from_workers(self, batches: Iterator[Any]) -> Iterator[Any]:
        """The DataLoader's batches, with stalled or dead workers reported."""
        ds: StreamingNeuralDataset = self.dataset
        waiting_since = time.monotonic()
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except (RuntimeError, EOFError, ConnectionError) as exc:
                # the DataLoader's short timeout, or a worker that died: reported as such (a batch a
                # dead worker had queued fails to unpickle with EOFError or a ConnectionError,
                # possibly before the dying worker is seen as dead: give it a moment)
                lost_sender = isinstance(exc, (EOFError, ConnectionError))
                dead = _any_dead(getattr(batches, "_workers", []), wait_s=DEATH_WAIT_S if lost_sender else 0.0)
                timed_out = "timed out" in str(exc)
                if not dead and not timed_out:
                    raise
                if dead or time.monotonic() - waiting_since >= self.stall_timeout:
                    raise self._stalled(batches, exc) from exc
                continue  # the workers are alive: wait on (the DataLoader resumes where it was)
            ds._steps += 1
            yield ds.deliver(batch)
            waiting_since = time.monotonic()
        handover.forget_exited()  # the buffers of workers stopped at the end of the pass
        ds._end_pass()

    def _lost_a_worker(self) -> bool:
        """Has a kept worker exited (kept workers exit only when stopped)?"""
        return any(not w.is_alive() for w in getattr(self._iterator, "_workers", []))

    def _stop_workers(self, batches: Any) -> None:
        """Stop the worker processes behind ``batches`` (the DataLoader's own shutdown: stop
        signal, join, terminate what is left) and forget them; the next pass starts new ones."""
        self._iterator = None
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def _stalled(self, batches: Any, exc: Exception) -> StreamStalledError:
        """The error for workers that stopped delivering or died; stops them first (a stuck worker
        would otherwise outlive the pass as long as the traceback keeps the iterator)."""
        ds: StreamingNeuralDataset = self.dataset
        workers = getattr(batches, "_workers", [])
        report = ds.activity.describe(self.num_workers, workers, ds._where())
        if dead := [w for w in workers if died(w)]:
            what = "a DataLoader worker died"
            hint = RERUN_FIX if any(died_rerunning_main(w.pid) for w in dead) else DEATH_FIX
        else:
            what = f"{type(exc).__name__}: no batch for {self.stall_timeout:g} s"
            hint = f"{STALL_FIX} (now {self.stall_timeout:g} s)"
            if context_method(self.multiprocessing_context) == "fork" and (threads := foreign_threads()):
                hint += (f"; threads {threads} of this process were alive at fork: a forked worker can hang on "
                         "a lock one of them held (multiprocessing_context='forkserver' avoids it)")
        self._stop_workers(batches)
        return StreamStalledError(f"streaming {ds._where()}: {what}. Epoch {ds.epoch}, pass stopped; the workers "
                                  f"were:\n{report}\nWhat to do: {hint}.")
