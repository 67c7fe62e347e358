"""``StreamingNeuralDataset``: an ``IterableDataset`` over a store URL or any dataset.

It composes the pure functions of :mod:`~deepstrf.stream.shuffle` (the
epoch's order) and :mod:`~deepstrf.stream.partition` (who reads what) with
the reading layer (:mod:`~deepstrf.stream.reader`, prefetch, cache,
retries). See ``docs/streaming.md`` for the semantics.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import os
import shutil
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.context import get_spawning_popen
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..datasets import views
from ..datasets.neural_dataset import NeuralDataset
from ..forksafe import kept_pool, run_gated, usable_cpus
from ..store import shards
from ..store.dataset import load_indexes, opened_version, storage_io, warm_reads
from ..store.location import on_network
from ..tempdirs import new_process_dir
from . import handover, items, partition, reader, shuffle
from .buffers import DEFAULT_SLOTS, BufferPool, process_pool, slots_for
from .cache import RowCache
from .lead import Lead
from .loader import StreamingDataLoader
from .prefetch import Prefetcher
from .retry import RetryPolicy, call_with_retries
from .stats import StorageIO, StreamCounters, summarize
from .transfer import for_new_process
from .workers import DEFAULT_TIMEOUT_S, WorkerActivity, freeze_long_lived, ignore_interrupts, start_worker_server

Collate = Literal["compact", "dense"]
STATE_VERSION = 1
# the settings the epoch's order depends on: a state resumes only a dataset with the same ones
ORDER_SETTINGS = ("seed", "shuffle", "source_homogeneous", "block_size", "shuffle_buffer")
SHUFFLE_SETTINGS = ("block_size", "shuffle_buffer")  # of these, the ones only a shuffled order depends on
# Without batch_size (and without loader_batch_size), a process reads this many of its items at once.
ITEM_READ_GROUP = 8


@dataclass
class Opened:
    """A dataset opened in this process, with its selection resolved once."""

    pid: int
    ds: NeuralDataset
    visible: np.ndarray           # global stim index of each visible item
    selection: reader.Selection   # global neuron ids items expose, in item order
    pos_of: np.ndarray            # global neuron id -> position in the selection, or -1
    read_neurons: list[int] | None  # what to pass to read_raw_rows (None: all neurons)
    in_order: bool                  # the selection lists neurons in stored order: rows need no reordering
    stim_pool: ThreadPoolExecutor | None  # reads a batch's stimuli beside its responses (None: in line)
    io: StorageIO | None            # storage requests/bytes of a store-backed dataset, else None
    read_threads: int               # threads reading ahead in this process
    waits_on_network: bool          # its store, or a pool's sources, are not local
    cache: RowCache | None          # the row cache of cache_dir (None: rows are read each time)


def _grouped(tasks: Iterator[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Consecutive tasks concatenated ``size`` at a time (the last group may be smaller)."""
    group: list[np.ndarray] = []
    for task in tasks:
        group.append(task)
        if len(group) == size:
            yield np.concatenate(group)
            group = []
    if group:
        yield np.concatenate(group)


def begun(share: Iterator[Any]) -> Iterator[Any]:
    """``share`` with its first element read now. An error reading it is raised by the first
    ``next`` instead: torch makes a kept worker's iterator for a new pass outside the code that
    sends a worker's errors to the main process, where it would kill the worker. (2 forked
    workers over S3 on 2 cores, three sets of 10 alternating one-epoch runs: first batch
    0.262-0.265 -> 0.245-0.260 s; items/s within the noise, 0.99-1.02x.)"""
    try:
        first = next(share)
    except StopIteration:
        return iter(())
    except Exception as exc:
        return _raising(exc)
    return itertools.chain((first,), share)


def _raising(exc: Exception) -> Iterator[Any]:
    yield from ()
    raise exc


class _SharedPosition:
    """An int attribute kept in the dataset's shared-memory ``_position`` tensor, so that
    persistent DataLoader workers read the value the main process set."""

    def __init__(self, index: int, doc: str) -> None:
        self.index, self.__doc__ = index, doc

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else int(obj._position[self.index])

    def __set__(self, obj: Any, value: int) -> None:
        obj._position[self.index] = value


class StreamingNeuralDataset(IterableDataset):
    """Stream the visible items of a source or pool into PyTorch, sharded and shuffled.

    ``source`` is a store URL (opened here, and again in every other process
    that reads, with :func:`deepstrf.open_dataset`, ``storage_options`` — one
    options dict, or URL prefixes mapped to options — and ``open_options``, e.g. a
    pool's ``allowed_roots`` or a source's ``version``; the other processes open
    the source version opened here, whatever was published since) or a dataset
    object (any ``NeuralDataset``: in memory, a concatenation, store-backed).

    Without ``batch_size`` it yields items equal to map-style ``ds[i]``,
    whose responses stay compact until accessed
    (:class:`~deepstrf.stream.items.StreamItem`): batch them with
    ``DataLoader(ds, batch_size=B, collate_fn=compact_collate)`` or
    ``collate_fn=neural_collate``; ``loader_batch_size=B`` plans the epoch in
    batches of ``B`` items (one read each, one DataLoader worker each), so those
    batches equal the ones the dataset builds itself. With ``batch_size`` it
    yields whole batches, ``collate="compact"``
    (:class:`~deepstrf.utils.data.CompactBatch`, counts in their stored
    integer dtype) or ``"dense"`` (the ``neural_collate`` dict); use
    ``DataLoader(ds, batch_size=None)`` or :meth:`loader` then.
    ``source_homogeneous=True`` makes every batch come from one source.

    Selection: ``stims`` (stim indices, as ``select_stims``), ``neurons``
    (as ``select_population``) and ``select`` (a callable applying any
    ``select_*`` to the opened dataset) replace the dataset's own selection;
    the §3 visibility rule applies. ``select`` runs where the dataset is
    built; worker processes that are not forked receive the stims and
    neurons it selected (so it need not be picklable). ``subset`` (global
    stim indices) streams only those of the visible items, like a torch
    ``Subset``: unlike ``stims``, it leaves the neurons items expose as they
    are, so train / val / test subsets share one neuron axis (dense batches of
    one shape for one model).

    Every visible item is read once per epoch across all ranks and workers
    (ranks: padded by repeating up to ``world_size - 1`` items, or dropped
    with ``drop_last``; see :mod:`deepstrf.stream.partition`). ``rank`` and
    ``world_size`` default to ``torch.distributed`` when it is initialised.
    Order is a pure function of ``(seed, epoch)``: call :meth:`set_epoch`.
    The epoch and the resume position are shared with DataLoader workers, so
    ``persistent_workers=True`` follows them too.

    Reading: one ``read_raw_rows`` call per batch (concurrent range reads in
    store-backed grids), ``prefetch`` batches read ahead (default 2 in the
    main process, 1 in a DataLoader worker, whose ``prefetch_factor`` already
    reads ahead) by ``read_threads``
    threads (default 2 for a store URL over a network, so one batch's round trips
    overlap another's decoding; 1 for a store on local disk, whose reads are CPU
    work a second thread only contends with, and for a dataset object, whose
    reads may not be thread-safe), each batch's stimuli read beside its responses by one more
    thread (in line for a store on local disk, whose reads are CPU work),
    retries per ``retry``, an optional LRU row cache of at most
    ``cache_bytes`` in ``cache_dir``.

    ``device`` (with ``batch_size``): where batches are delivered. The reading
    processes then build compact batches, and the consumer's process moves each
    one there and, for ``collate="dense"``, builds the dense batch there
    (:meth:`deliver`): on a GPU the host never holds a dense batch. Without it,
    batches stay on the host as built (the right choice for training on the CPU).

    Batch buffers: with ``reuse_buffers`` (default), the large buffers of a
    batch are reused for a later batch once nothing refers to it any more
    (:mod:`deepstrf.stream.buffers`); a batch you keep, or send on to another
    process, is never overwritten. Turning it off costs fresh memory for every
    batch.
    """

    def __init__(self, source: str | os.PathLike | NeuralDataset, *, storage_options: dict | None = None,
                 shuffle: bool = True, seed: int = 0, batch_size: int | None = None,
                 collate: Collate = "compact", source_homogeneous: bool = False,
                 stims: Sequence[int] | None = None, neurons: Sequence[int] | None = None,
                 select: Callable[[NeuralDataset], Any] | None = None,
                 rank: int | None = None, world_size: int | None = None, drop_last: bool = False,
                 block_size: int = 8, shuffle_buffer: int = 256, prefetch: int | None = None,
                 read_threads: int | None = None, cache_dir: str | os.PathLike | None = None,
                 cache_bytes: int = 2 << 30, retry: RetryPolicy = RetryPolicy(), reuse_buffers: bool = True,
                 loader_batch_size: int | None = None, subset: Sequence[int] | None = None,
                 open_options: dict | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        if isinstance(source, NeuralDataset):
            self.url: str | None = None
            self._source: NeuralDataset | None = source
        elif isinstance(source, (str, os.PathLike)):
            self.url, self._source = os.fspath(source), None
        else:
            raise TypeError(f"source must be a store URL or a NeuralDataset, got {type(source).__name__}")
        if collate not in ("compact", "dense"):
            raise ValueError(f"collate must be 'compact' or 'dense', got {collate!r}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        if loader_batch_size is not None and (batch_size is not None or loader_batch_size < 1):
            raise ValueError(f"loader_batch_size={loader_batch_size!r} plans items for a DataLoader's batches: it "
                             "needs batch_size=None (the dataset yields items) and must be >= 1; with batch_size "
                             "the dataset builds the batches itself")
        if device is not None and batch_size is None:
            raise ValueError(f"device={device!r} delivers the batches the dataset builds on a device: it needs "
                             "batch_size (items batched by a DataLoader: move the batch yourself, "
                             "e.g. compact_collate(...).to(device).to_dense(ds.selected_neurons()))")
        if source_homogeneous and batch_size is None:
            raise ValueError("source_homogeneous=True needs a batch_size (batches are built by the dataset)")
        if neurons is not None:  # up front (a dataset object is opened on first use); any iterable
            neurons = list(neurons)
            reader.check_unique(neurons, f"neurons= (for {self._where()})")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither (torch.distributed is used then)")
        self.storage_options = storage_options
        self.open_options = dict(open_options or {})
        self.shuffle = shuffle
        self.seed = seed
        self.batch_size = batch_size
        self.loader_batch_size = loader_batch_size
        self.collate = collate
        self.device = None if device is None else torch.device(device)
        self.source_homogeneous = source_homogeneous
        self._opened: Opened | None = None
        self._version: str | None = None  # the source version first opened (_open), reopened elsewhere
        self.subset = subset
        self._selection_args = (None if stims is None else list(stims),
                                None if neurons is None else list(neurons), select)
        self._rank, self._world_size = rank, world_size
        self._dist_seen = (0, 1)
        self.drop_last = drop_last
        self.block_size, self.shuffle_buffer = block_size, shuffle_buffer
        self.prefetch = prefetch
        self.read_threads = read_threads  # None: chosen when opened (_read_threads)
        self.cache_dir, self.cache_bytes = cache_dir, cache_bytes
        self.retry = retry
        self.reuse_buffers = reuse_buffers
        if reuse_buffers:  # workers forked from this process push their buffers' descriptors to it
            handover.open_channel()
        # whole shards of an object store that one DataLoader worker fetched, for the others;
        # removed with this object in the process that made it (workers never remove it)
        self._shard_dir = new_process_dir("shards")
        weakref.finalize(self, _remove_owned_dir, self._shard_dir, os.getpid())
        # the epoch and the units of it consumed before this pass (resume) live in shared memory:
        # persistent DataLoader workers see set_epoch, load_state_dict and the end of a pass
        self._position = torch.zeros(2, dtype=torch.int64).share_memory_()
        self._steps = 0         # batches yielded by this rank since the offset
        self._read_timeout: float | None = None  # a bound on each read of a pass in this process (loader())
        self.counters = StreamCounters()
        self.activity = WorkerActivity()
        self._lead = Lead()
        self.rank_world()
        self.last_prefetcher: Prefetcher | None = None
        if get_worker_info() is None:
            start_worker_server(runs_user_code=self._source is not None)
        if self.url is not None:
            # open here too: a bad URL fails now, and forked DataLoader workers inherit the
            # storage client's modules and the sources' cell index instead of each importing
            # and reading them before their first batch
            self._state()

    # -- opening (once per process) ------------------------------------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self._selection_args[2] is not None:
            # a select callable (a lambda, say) need not pickle: other processes get what it selected
            ds = self._state().ds
            state["_selection_args"] = (ds.S_sel, ds.I or None, None)
        state["_opened"] = None  # reopened (URL) or re-derived from the source in the new process
        state["last_prefetcher"] = None
        state["_source"] = for_new_process(self._source)
        if get_spawning_popen() is not None:
            # a forkserver worker has the environment of the server, frozen when it started: it gets the
            # one this process has now (credentials set since, say), as a forked or spawned one would
            state["_environ"] = dict(os.environ)
        return state

    def __setstate__(self, state: dict) -> None:
        environ = state.pop("_environ", None)
        if environ is not None and environ != os.environ:
            os.environ.clear()
            os.environ.update(environ)
        self.__dict__.update(state)

    def dataset(self) -> NeuralDataset:
        """The opened dataset with the selection applied (opened once per process)."""
        return self._state().ds

    def selected_neurons(self) -> list[int]:
        """Global indices of the neurons a batch carries, in order: what ``CompactBatch.to_dense``
        takes to lay out a dense batch of this stream."""
        return self.dataset().selected_neurons()

    def _waits_on_network(self) -> bool:
        """Whether reads wait on a network; a dataset object is asked as it is (not opened here)."""
        return _waits_on_network(self._source) if self._source is not None else self._state().waits_on_network

    def _state(self) -> Opened:
        if self._opened is None or self._opened.pid != os.getpid():
            # a forked worker reuses the dataset its parent opened: store-backed parts reopen
            # their storage handles in this process on first use, the loaded index is kept
            ds = self._open() if self._opened is None else self._opened.ds
            selection = reader.Selection.of(ds.selected_neurons(), self._where())
            in_order = bool((np.diff(selection.neurons) > 0).all())
            everything = in_order and len(selection.neurons) == ds.N_neurons
            remote = _waits_on_network(ds)
            # a store URL on a local disk (and its pool's sources): reads are CPU work in the reading
            # thread (store/localfiles.py), not waits a second thread could overlap
            local_files = self.url is not None and not remote
            threads = self._read_threads(remote)
            read_neurons = None if everything else selection.neurons.tolist()
            self._opened = Opened(os.getpid(), ds, self._visible(ds), selection,
                                  selection.positions(ds.N_neurons), read_neurons, in_order,
                                  None if local_files else ThreadPoolExecutor(max_workers=threads,
                                                                              thread_name_prefix="deepstrf-stims"),
                                  None if (io := storage_io(ds)) is None else StorageIO(io), threads, remote,
                                  self._cache(ds, read_neurons))
        return self._opened

    def _read_threads(self, remote: bool) -> int:
        """Threads reading ahead: as given, else 2 for a store URL over a network (one batch's round
        trips overlap another's decoding) and 1 otherwise: local reads are CPU work, which a second
        thread only contends with for the GIL (one process at K = 10^4: 889-998 -> 1,359-1,441
        items/s), and a dataset object's reads may not be thread-safe. A DataLoader worker reads
        with one thread where two per worker would be more threads decoding than the machine has
        cores (2 cores, 2 workers, first epoch over S3: 198-205 -> 213 items/s after the first batch)."""
        if self.read_threads is not None:
            return self.read_threads
        if self.url is None or not remote:
            return 1
        info = get_worker_info()
        return 2 if info is None or usable_cpus() >= 2 * info.num_workers else 1

    def _visible(self, ds: NeuralDataset) -> np.ndarray:
        """Global stim index of each item this dataset streams: the visible stims (in ``subset``)."""
        visible = np.asarray(ds.visible_stims(), dtype=np.int64)
        if self.subset is None:
            return visible
        if self.subset and not 0 <= self.subset[0] <= self.subset[-1] < ds.get_S():
            raise IndexError(f"subset: stim indices must be in [0, {ds.get_S()}) for {self._where()}, got "
                             f"{self.subset[0]}..{self.subset[-1]}")
        return visible[np.isin(visible, self.subset)]

    def _open(self) -> NeuralDataset:
        if self.url is not None:
            from ..store import open_dataset

            def open_with_index() -> NeuralDataset:
                ds = open_dataset(self.url, storage_options=self.storage_options, **self._pinned_options())
                load_indexes(ds, stim_meta=True)
                return ds

            ds = call_with_retries(open_with_index, what=f"store {self.url}", policy=self.retry)
            if self._version is None:  # the first opening (in the process that built this object)
                self._version = opened_version(ds)
        else:
            ds = copy.copy(self._source)
        stims, neurons, select = self._selection_args
        if stims is not None:
            ds.select_stims(stims)
        if neurons is not None:
            ds.select_population(neurons)
        if select is not None:
            select(ds)
        return ds

    def _pinned_options(self) -> dict:
        """``open_options``, with the version this object first opened (the one its epochs are planned
        over) pinned: a worker that is not forked, or a copy sent elsewhere, opens that version, not
        whatever is the latest when it starts (a tag or the latest resolved to the concrete version)."""
        if self._version is None:
            return self.open_options
        return {**self.open_options, "version": self._version}

    def _where(self) -> str:
        return self.url or str(getattr(self._source, "path", type(self._source).__name__))

    # -- the epoch's plan (pure functions) -----------------------------------------
    def rank_world(self) -> tuple[int, int]:
        """``(rank, world_size)``: as given, else from ``torch.distributed``, else ``(0, 1)``.

        DataLoader workers cannot see the process group; they use what the
        main process saw last (at construction, ``set_epoch``, ``len``...),
        so build the dataset or call ``set_epoch`` after ``init_process_group``.
        """
        if self._world_size is not None:
            return self._rank, self._world_size
        if get_worker_info() is None:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                self._dist_seen = (torch.distributed.get_rank(), torch.distributed.get_world_size())
            else:
                self._dist_seen = (0, 1)
        return self._dist_seen

    def _units(self, st: Opened) -> list[np.ndarray]:
        """The epoch's order as units (arrays of item positions): items, or homogeneous batches."""
        n = len(st.visible)
        opts = dict(shuffle=self.shuffle, seed=self.seed, epoch=self.epoch,
                    block_size=self.block_size, buffer_size=self.shuffle_buffer)
        if not self.source_homogeneous:
            return shuffle.item_order(n, **opts)[:, None]
        groups = [np.flatnonzero((st.visible >= stims.start) & (st.visible < stims.stop))
                  for _, stims, _ in st.ds.source_blocks()]
        return shuffle.homogeneous_batches([g for g in groups if len(g)], self.batch_size, **opts)

    def _unit_batch(self) -> int:
        """Units per batch in the partition (homogeneous units are whole batches already)."""
        if self.source_homogeneous:
            return 1
        if self.batch_size is None:
            return self.loader_batch_size or 1
        return self.batch_size

    def _n_units(self, st: Opened) -> int:
        if not self.source_homogeneous:
            return len(st.visible)
        return len(self._units(st))

    def __len__(self) -> int:
        """Batches (or items, without ``batch_size``) this rank yields in the rest of this epoch; a
        whole epoch once a pass has handed out every batch of it (the next pass streams the next)."""
        return self._remaining(0 if self._delivered_whole_pass() else self._offset)

    def batches_per_epoch(self) -> int:
        """Batches (or items, without ``batch_size``) this rank yields in a whole epoch, whatever part
        of the current one was consumed before a resume (a trainer counting an epoch's batches)."""
        return self._remaining(0)

    def _remaining(self, offset: int) -> int:
        _, world = self.rank_world()
        if self.batch_size is None:
            return partition.units_per_rank(self._n_units(self._state()), offset, world, self.drop_last)
        return partition.num_batches(self._n_units(self._state()), offset, world, self._unit_batch(),
                                     self.drop_last)

    # -- epochs and resumption ---------------------------------------------------
    epoch = _SharedPosition(0, "The epoch whose order is streamed (see :meth:`set_epoch`).")
    _offset = _SharedPosition(1, "Units of this epoch consumed before this pass (resume).")

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order to stream; a new epoch starts from its beginning
        and zeroes the counters (a resumed epoch keeps its offset)."""
        self.rank_world()
        if epoch != self.epoch:
            self.epoch, self._offset, self._steps = epoch, 0, 0
            self.counters.reset()

    def state_dict(self, batches: int | None = None) -> dict:
        """Position in the epoch, as units of the global order consumed by all ranks.

        Counted from the batches this rank received: by iterating in this
        process, or through :meth:`loader` with worker processes; or, with
        ``batches``, as if only the first ``batches`` batches of this pass had
        been (a consumer that reads ahead, as Lightning's trainer does, has
        received more than it used). All ranks agree (they advance in
        lockstep), so any rank's state resumes all.
        """
        _, world = self.rank_world()
        n_units = self._n_units(self._state())
        steps = self._steps if batches is None else batches
        consumed = partition.consumed_after(n_units, self._offset, world, self._unit_batch(), steps,
                                            self.drop_last)
        return {"version": STATE_VERSION, "epoch": self.epoch, **{key: getattr(self, key) for key in ORDER_SETTINGS},
                "batch_size": self.batch_size, "n_units": n_units, "consumed": consumed}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state`` (from :meth:`state_dict`), with any number of ranks or workers."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown streaming state version {state.get('version')!r} (expected {STATE_VERSION})")
        for key in ORDER_SETTINGS:
            # a state saved before block_size and shuffle_buffer were recorded lacks them; without
            # shuffling they do not change the order
            if key in SHUFFLE_SETTINGS and not self.shuffle:
                continue
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"cannot resume: state has {key}={state[key]!r}, this dataset {getattr(self, key)!r}: "
                                 f"the epoch's order would differ, repeating and skipping items; build the dataset "
                                 f"with {key}={state[key]!r} to resume this state")
        if self.source_homogeneous and state["batch_size"] != self.batch_size:
            raise ValueError("cannot resume source-homogeneous batches with a different batch_size "
                             f"({state['batch_size']} -> {self.batch_size})")
        n_units = self._n_units(self._state())
        if state["n_units"] != n_units:
            raise ValueError(f"cannot resume: the state covers {state['n_units']} items, this dataset has "
                             f"{n_units} under its selection; resume on the same store and selection")
        self.epoch, self._offset, self._steps = state["epoch"], state["consumed"], 0
        self.counters.reset()

    @property
    def subset(self) -> list[int] | None:
        """Global stim indices streamed (None: every visible stim). May be set between epochs: the
        next one reads the new subset, with workers or without."""
        return self._subset

    @subset.setter
    def subset(self, value: Sequence[int] | None) -> None:
        self._subset = None if value is None else sorted({int(s) for s in value})
        if self._opened is not None:  # the visible items were resolved with the old subset
            self._opened = dataclasses.replace(self._opened, visible=self._visible(self._opened.ds))

    def _worker_settings(self) -> str:
        """The settings a DataLoader worker's copy of this dataset reads with, as one string: a
        :class:`StreamingDataLoader` restarts its kept workers when it changes. What the workers
        share with this object (the epoch, the resume position) is not in it."""
        return repr((self.url, self.storage_options, self.open_options, self.shuffle, self.seed, self.batch_size,
                     self.loader_batch_size, self.collate, self.device, self.source_homogeneous, self.subset,
                     self._selection_args, self.rank_world(), self.drop_last, self.block_size, self.shuffle_buffer,
                     self.prefetch, self.read_threads, self.cache_dir, self.cache_bytes, self.retry,
                     self.reuse_buffers, id(self._source)))

    # -- iteration ----------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        """This rank's (and worker's) share of the rest of the epoch, read ahead in order.

        A complete pass in this process advances to the next epoch (with
        worker processes, :meth:`loader` does that; a plain ``DataLoader``
        cannot, so call :meth:`set_epoch`).
        """
        if get_worker_info() is None:
            self._end_delivered_pass()
        share = self._share()
        # torch makes a worker's iterator as the worker starts, then waits for its first index
        # (sent once every worker has started): begin reading meanwhile
        return share if get_worker_info() is None else begun(share)

    def _share(self) -> Iterator[Any]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        in_process = info is None
        if not in_process:
            self.activity.opening(worker_id + 1)
        st = self._state()
        if in_process:
            self._begin_pass()
        else:
            ignore_interrupts()
            shards.SHARD_CACHE.share(self._shard_dir)
            shards.set_decode_threads(max(1, usable_cpus() // num_workers))  # the workers share the cores
            freeze_long_lived()
        slot = 0 if in_process else worker_id + 1
        self.counters.use_slot(slot)
        self.counters.reset_slot()
        self.activity.use_slot(slot)
        units, batches = self._plan(st)
        if not in_process:  # the pass's first batches may have been read by the main process (lead.py)
            batches = batches[self._lead.wait_closed(DEFAULT_TIMEOUT_S, self._where()):]
        mine = partition.worker_batches(batches, worker_id, num_workers)
        tasks = self._tasks(units, (positions for _, positions in mine))
        if not in_process and st.waits_on_network:
            tasks = self._warming(st, tasks)
        unit = self._unit_batch()
        if self.batch_size is None and unit == 1:  # single items: read a few of this process's at once
            tasks = _grouped(tasks, ITEM_READ_GROUP)
        timeout = self._read_timeout if in_process else None
        for out in self._read_ahead(tasks, shared=not in_process, timeout=timeout):
            if self.batch_size is not None:
                if in_process:
                    self._steps += 1  # counted before the hand-over: the consumer holds it from here
                    out = self.deliver(out)
                yield out
                continue
            for k, item in enumerate(out):
                if in_process and k % unit == 0:  # a planned batch counts when its first item is handed over
                    self._steps += 1
                yield item
            # let the consumer's dropping these items free their read buffer before the next read
            out = item = None
        if in_process:
            self._end_pass()

    def _plan(self, st: Opened) -> tuple[Any, list[np.ndarray]]:
        """This rank's pass: the epoch's units and the positions (into them) of each of its batches."""
        rank, world = self.rank_world()
        units = self._units(st)
        return units, partition.rank_batches(len(units), self._offset, world, rank, self._unit_batch(),
                                             self.drop_last)

    @staticmethod
    def _tasks(units: Any, batches: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        """The item positions each batch reads, made as they are read (the first read starts without
        gathering 10^4 batches' positions first)."""
        if isinstance(units, np.ndarray):  # units of one item each: one gather per batch
            return (units[positions].reshape(-1) for positions in batches)
        return (np.concatenate([units[p] for p in positions]) for positions in batches)

    @staticmethod
    def _warming(st: Opened, tasks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        """``tasks``, each one's shards fetched (not decoded) in a background thread as it is
        taken: the prefetcher takes a task while the one before it is read, so a worker, which
        reads one batch at a time, does not wait a round trip for a shard that no earlier batch
        fetched. The first two tasks are left to their reads: their fetches would only compete
        with the pass's first batch for the store. The pass ends with no fetch left running."""
        warming = kept_pool("deepstrf-warm", 1)
        last = None
        for i, positions in enumerate(tasks):
            if i >= 2:
                last = warming.submit(run_gated, warm_reads, st.ds, st.visible[positions].tolist())
            yield positions
        if last is not None:
            futures.wait([last])

    def _read_ahead(self, tasks: Iterator[np.ndarray], shared: bool, timeout: float | None = None) -> Iterator[Any]:
        """Read ``tasks`` in order, ahead of the consumer (``shared``: into shared memory, for a worker;
        ``timeout``: see :meth:`Prefetcher.map`)."""
        pool = self._buffer_pool(shared=shared)
        scratch = BufferPool(shared=False, slots=DEFAULT_SLOTS if self.reuse_buffers else 0)
        fetch = Prefetcher(lambda positions: self._read_batch(positions, pool, scratch),
                           depth=self._prefetch_depth(in_worker=get_worker_info() is not None),
                           threads=self._state().read_threads)
        self.last_prefetcher = fetch
        return fetch.map(tasks, timeout)

    def _lead_batches(self, timeout: float | None) -> Iterator[Any]:
        """The first batches of this rank's pass, read in the main process while a
        :class:`StreamingDataLoader` starts its workers, until the first of them begins (lead.py);
        a read that takes longer than ``timeout`` raises :class:`~deepstrf.stream.prefetch.ReadTimeout`."""
        st = self._state()
        self.counters.use_slot(0)
        self.activity.use_slot(0)
        units, batches = self._plan(st)
        claimed = iter(lambda: self._lead.claim(len(batches)), None)
        yield from self._read_ahead(self._tasks(units, (batches[step] for step in claimed)), shared=False,
                                    timeout=timeout)

    def _begin_pass(self) -> None:
        self._steps = 0
        self.counters.reset()

    def _end_pass(self) -> None:
        self.epoch, self._offset, self._steps = self.epoch + 1, 0, 0

    def _end_delivered_pass(self) -> None:
        """End a pass that handed out every batch of its epoch but was not run to its end (a trainer
        that stops after ``len(loader)`` batches, as Lightning's does): the next pass streams the
        next epoch, not the same order again."""
        if self._delivered_whole_pass():
            self._end_pass()

    def _delivered_whole_pass(self) -> bool:
        """Has this pass handed out every batch of its epoch?"""
        return self.batch_size is not None and self._steps > 0 and self._steps >= self._remaining(self._offset)

    @property
    def built_format(self) -> Collate:
        """The format this dataset's reading builds batches in: ``collate``, except that with a
        ``device`` dense batches are built there, from compact ones (:meth:`deliver`)."""
        return "compact" if self.collate == "compact" or self.device is not None else "dense"

    def deliver(self, batch: Any) -> Any:
        """A built batch as the consumer gets it: as built, or, with a ``device``, moved there
        (``non_blocking``) and, for ``collate="dense"``, made dense there
        (:meth:`CompactBatch.to_dense` over the selected neurons). Runs in the consumer's process."""
        if self.device is None:
            return batch
        batch = batch.to(self.device)
        return batch.to_dense(self._state().selection.neurons) if self.collate == "dense" else batch

    def _prefetch_depth(self, in_worker: bool) -> int:
        if self.prefetch is not None:
            return self.prefetch
        return 1 if in_worker else 2

    def _buffer_pool(self, shared: bool) -> BufferPool:
        """Where this pass's batches are built: shared memory in a DataLoader worker (no copy to the
        main process), reused buffers unless turned off. Shared memory comes from the process's own
        pool (:func:`~deepstrf.stream.buffers.process_pool`, kept across passes); the main process
        makes a pool per pass (nothing returns a private pool's buffers between epochs)."""
        if shared and self.reuse_buffers:
            return process_pool(self.built_format)
        return BufferPool(shared, slots=slots_for(self.built_format) if self.reuse_buffers else 0)

    def _read_batch(self, positions: np.ndarray, pool: BufferPool, scratch: BufferPool | None = None) -> Any:
        """Read the items at ``positions`` of the visible list: one batched row read (``scratch``: where
        counts that do not go straight into the batch are decoded; default: fresh memory)."""
        st = self._state()
        stims = st.visible[positions].tolist()
        self.activity.begin(stims)
        try:
            return self._read_stim_batch(st, stims, pool, scratch or BufferPool(shared=False, slots=0))
        finally:
            self.activity.end()

    def _read_stim_batch(self, st: Opened, stims: list[int], pool: BufferPool, scratch: BufferPool) -> Any:
        """The batch (or items) of ``stims``. Counts are decoded straight into the compact batch's
        buffer, else into a reused private ``scratch`` buffer (dense batches cast them from there;
        items keep views of it)."""
        ds = st.ds
        start = time.perf_counter()
        if st.stim_pool is None:  # local files: reading is CPU work, another thread would only contend
            stim_tensors, pending = self._read_stims(st, stims), None
        else:
            # the items' metadata too (its table is read on first use: not after the counts' read)
            pending = st.stim_pool.submit(run_gated, self._read_stims_and_meta, st, stims)
        compact_batch = self.batch_size is not None and self.built_format == "compact"
        try:
            values, out = self._batch_buffer(st, stims, pool if compact_batch else scratch)
            rows = self._read_rows(st, stims, out)
        except BaseException:
            # the batch has failed: its stimulus read must not go on behind the caller's back (into
            # caches, counters, a later pass); its own outcome no longer matters
            if pending is not None:
                pending.cancel()
                futures.wait([pending])
            raise
        if pending is not None:
            stim_tensors, metas = pending.result()
        else:
            metas = [ds.stim_meta[s] for s in stims]
        ordered = [reader.order_cells(r, st.pos_of) for r in rows]
        used = sum(r.values.nbytes for r in ordered) + sum(t.numel() * t.element_size() for t in stim_tensors)
        self.counters.add(items=len(stims), batches=1, bytes_used=used,
                          read_us=int((time.perf_counter() - start) * 1e6))
        n_selected = len(st.selection.neurons)
        if self.batch_size is None:
            masks = torch.from_numpy(ds.coverage.cells(stims, st.selection.neurons))
            return items.make_items(ordered, stim_tensors, metas, masks, n_selected)
        if compact_batch:
            return reader.build_compact(ordered, stim_tensors, metas, pool, values)
        return reader.build_dense(ordered, stim_tensors, metas, n_selected, pool)

    def _read_stims(self, st: Opened, stims: list[int]) -> list[torch.Tensor]:
        """The batch's stimuli in one batched (retried) read."""
        xs = call_with_retries(lambda: views.read_many(st.ds.stims, stims),
                               what=f"stimuli {stims} from {self._where()}",
                               policy=self.retry, on_retry=lambda exc: self.counters.add(retries=1))
        self._count_io(st, sum(x.numel() * x.element_size() for x in xs))
        return xs

    def _read_stims_and_meta(self, st: Opened, stims: list[int]) -> tuple[list[torch.Tensor], list[dict]]:
        metas = [st.ds.stim_meta[s] for s in stims]  # first: a table read is a round trip, not CPU work
        return self._read_stims(st, stims), metas

    def _count_io(self, st: Opened, nbytes: int) -> None:
        """Count a batched read: the storage requests and bytes (as stored) it caused for a
        store-backed dataset, else one read call and the bytes it returned."""
        if st.io is None:
            self.counters.add(requests=1, bytes_fetched=nbytes)
            return
        requests, fetched = st.io.delta(storage_io(st.ds))
        self.counters.add(requests=requests, bytes_fetched=fetched)

    def _batch_buffer(self, st: Opened, stims: list[int], pool: BufferPool
                      ) -> tuple[torch.Tensor | None, list[np.ndarray] | None]:
        """A buffer of ``pool`` for the batch's counts and its per-row views, for rows to be decoded
        straight into (store-backed grids know the sizes before reading); ``(None, None)`` otherwise."""
        if not st.in_order:
            return None, None
        layout = views.raw_row_sizes(st.ds.responses, stims, st.read_neurons)
        if layout is None:
            return None, None
        sizes, dtype = layout
        values = pool.alloc((int(sizes.sum()),), dtype)
        return values, np.split(values.numpy(), np.cumsum(sizes)[:-1])

    def _read_rows(self, st: Opened, stims: list[int], out: list[np.ndarray] | None = None) -> list[views.RawRow]:
        """Rows of ``stims`` from the cache, else in one batched (retried) read; with ``out``,
        row ``i``'s values land in ``out[i]``."""
        cache = st.cache
        found = {} if cache is None else {s: r for s in stims if (r := cache.get(s)) is not None}
        todo = [i for i, s in enumerate(stims) if s not in found]
        if found:
            self.counters.add(cache_hits=len(found))
            if out is not None:
                views.fill_rows([found[s] for s in stims if s in found], [out[i] for i, s in enumerate(stims)
                                                                          if s in found])
        if todo:
            bufs = None if out is None else [out[i] for i in todo]
            rows = call_with_retries(lambda: views.read_raw_rows(st.ds.responses, [stims[i] for i in todo],
                                                                 st.read_neurons, bufs),
                                     what=f"responses of stims {[stims[i] for i in todo]} from {self._where()}",
                                     policy=self.retry, on_retry=lambda exc: self.counters.add(retries=1))
            self._count_io(st, sum(r.values.nbytes for r in rows))
            for row in rows:
                found[row.stim] = row
                if cache is not None:
                    cache.put(row)
        return [found[s] for s in stims]

    def _cache(self, ds: NeuralDataset, neurons: list[int] | None) -> RowCache | None:
        """The row cache of ``cache_dir`` for ``ds``, keyed by what its cells are (the store's
        fingerprint and each recorded transform, see ``content_signature``) and the neurons read.
        None without ``cache_dir``, and, with a warning, where the cells have no such description:
        their cached rows could not be told from another dataset's."""
        if self.cache_dir is None:
            return None
        signature = views.content_signature(ds.responses)
        if signature is None:
            if get_worker_info() is None:  # once, not once per DataLoader worker
                warnings.warn(f"cache_dir={os.fspath(self.cache_dir)!r} is not used for {self._where()}: its "
                              "responses are not read as a store holds them (data in memory, cells set by hand, "
                              "a transform of your own, or a pool opened with accept_changed_sources=True, "
                              "whose sources may have changed), so their cached rows could not be told from another "
                              "dataset's; rows are read each time. Stream a store (transformed by "
                              "normalize_responses or smooth_responses, or not), or leave out cache_dir.",
                              UserWarning, stacklevel=2)
            return None
        return RowCache(self.cache_dir, self.cache_bytes, f"{self._where()}#{signature}", neurons)

    # -- observability -------------------------------------------------------------
    def stats(self, seconds: float | None = None) -> dict[str, float]:
        """Counters of the current pass (summed over this rank's DataLoader workers).

        ``requests`` and ``bytes_fetched``: for a store URL or store-backed
        dataset, the requests made to storage and the bytes it returned as
        stored (compressed), opening excluded; for an in-memory dataset, the
        read calls made to it (one batched response read and one batched
        stimulus read per batch) and the bytes they returned. Cache hits make
        none. ``bytes_used``: bytes of counts and stimuli put into batches
        (decoded; cache hits included). With ``seconds``, rates are added.
        """
        return summarize(self.counters.totals(), seconds)

    def loader(self, num_workers: int = 0, **kwargs: Any) -> StreamingDataLoader:
        """A ``DataLoader`` over this dataset that tracks progress for :meth:`state_dict`, starts
        worker processes safely and reports stalled ones (see :class:`StreamingDataLoader`)."""
        return StreamingDataLoader(self, num_workers=num_workers, **kwargs)

    def __repr__(self) -> str:
        return (f"StreamingNeuralDataset({self._where()!r}, batch_size={self.batch_size}, "
                f"collate={self.collate!r}, device={self.device}, shuffle={self.shuffle}, seed={self.seed}, "
                f"epoch={self.epoch})")


def _waits_on_network(ds: NeuralDataset) -> bool:
    """Whether reading ``ds`` waits on a network: its store, or a pool's sources, are not local."""
    urls = [getattr(ds, "store_url", None), *(e["url"] for e in getattr(ds, "pool_sources", None) or [])]
    return any(on_network(u) for u in urls if u)


def _remove_owned_dir(path: str, owner: int) -> None:
    """Remove ``path`` if this is the process that made it (a forked worker inherits finalizers)."""
    if os.getpid() == owner:
        shutil.rmtree(path, ignore_errors=True)
