"""Reading a source store: its root document, its index, cells and stims.

:class:`SourceReader` is the one object that reads a source store. It takes
every array's metadata from the root ``zarr.json`` (consolidated) and reads
the arrays in deepstrf's own layouts itself (:mod:`.direct`, :mod:`.shards`;
local files in the calling thread, :mod:`.localfiles`), leaving anything
else to zarr. It pickles as its URL, ``storage_options``, attributes and
array metadata, and makes its storage client again in each process
(fsspec/s3fs clients are not fork-safe). All reads of response cells and
stimuli go through :meth:`SourceReader.read_ranges`
(:meth:`~SourceReader.read_rows`, :meth:`~SourceReader.read_stims`): one
concurrent group of coalesced range reads for any number of stims, decoded
into the caller's arrays (a streamed batch's buffer) when it gives them.
"""
from __future__ import annotations

import asyncio
import copy
import json
import os
import threading
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.group import AsyncGroup
from zarr.core.sync import sync
from zarr.storage import StorePath

from ..datasets.views import RawRow, check_out
from ..errors import IncompleteStoreError, IntegrityError, StoreError, StoreNotFoundError
from . import format as fmt
from .atomic import store_state
from .direct import SmallArray
from .integrity import IOCounters, MissingChunk, StrictStore
from .jsonmeta import decode_meta
from .location import Location
from .schema import as_written, check_source
from .shards import ShardedArray, Target

_TRANSPORT_ERRORS = (OSError, TimeoutError, asyncio.TimeoutError)
_BIND_LOCK = threading.RLock()


def _new_bind_lock() -> None:
    global _BIND_LOCK
    _BIND_LOCK = threading.RLock()  # a lock held by a thread of the parent would never be released


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_bind_lock)


def read_root(loc: Location, store: StrictStore | None = None) -> dict[str, Any]:
    """The root ``zarr.json`` document of the store at ``loc`` (one small read; with consolidated
    metadata it describes every array too)."""
    if loc.is_local and not os.path.isdir(loc.url):
        what = "it is a file, not a store's folder" if os.path.exists(loc.url) else "the folder does not exist"
        raise StoreNotFoundError(f"no store at {loc.url}: {what}. Check the path.")
    store = store or StrictStore(loc.zarr_store(read_only=True))
    try:
        if store.reads_here:
            raw = store.read_here("zarr.json")
        else:
            raw = sync(store.get("zarr.json", default_buffer_prototype()))
            raw = None if raw is None else raw.as_numpy_array()
    except FileNotFoundError:
        raw = None
    if raw is not None:
        try:
            doc = json.loads(raw.tobytes())
            if not isinstance(doc, dict) or doc.get("zarr_format") != 3 or doc.get("node_type") != "group":
                raise ValueError("not the zarr.json of a zarr v3 group")
            if not isinstance(doc.get("attributes", {}), dict):
                raise ValueError("its attributes are not a JSON object")
            return doc
        except ValueError as e:
            raise IntegrityError(f"{loc.url}: the root zarr.json cannot be parsed ({e}); the store is damaged. "
                                 "Re-create it from its source.") from e
    if not loc.read_only and store_state(loc) == "partial":
        raise IncompleteStoreError(
            f"{loc.url} holds files but no root zarr.json: an incomplete store (an interrupted write), or no "
            "store at all. Check the path; if it is the remains of a deepstrf write, write it again with "
            "overwrite=True (which refuses to delete files a deepstrf store does not have).")
    raise StoreNotFoundError(f"no store at {loc.url} (no root zarr.json). Check the URL and storage_options.")


def group_of(loc: Location, doc: dict[str, Any], store: StrictStore | None = None) -> zarr.Group:
    """The read-only zarr group whose root document ``doc`` was read from ``loc``."""
    store = store or StrictStore(loc.zarr_store(read_only=True))
    try:
        return zarr.Group(AsyncGroup.from_dict(StorePath(store), copy.deepcopy(doc)))  # from_dict pops keys
    except (ValueError, TypeError, KeyError) as e:
        raise IntegrityError(f"{loc.url}: the root zarr.json cannot be parsed ({e}); the store is damaged. "
                             "Re-create it from its source.") from e


def open_group(loc: Location) -> zarr.Group:
    """Open the zarr group at ``loc`` read-only (one small read with consolidated metadata)."""
    store = StrictStore(loc.zarr_store(read_only=True))
    return group_of(loc, read_root(loc, store), store)


def consolidated_arrays(doc: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """The metadata document of every array, by path, from a root document with consolidated
    metadata; None without."""
    consolidated = doc.get("consolidated_metadata") or {}
    nodes = consolidated.get("metadata")
    if not isinstance(nodes, dict):
        return None
    return {path: node for path, node in nodes.items() if isinstance(node, dict) and node.get("node_type") == "array"}


def _direct(handles: _Handles, name: str, sel: Any) -> bool:
    """Is ``array[sel]`` read without zarr (a sharded array's slice, a small array whole)?"""
    return (name in handles.sharded and isinstance(sel, slice)) or (name in handles.small and sel is Ellipsis)


def _outcome(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, or the exception it raised (as ``asyncio.gather(..., return_exceptions=True)`` gives)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - reported by the caller, naming what was read
        return e


def _is_transport_error(e: BaseException) -> bool:
    return isinstance(e, _TRANSPORT_ERRORS) and not isinstance(e, MissingChunk)


INDEX_ARRAYS = (fmt.OFFSETS, fmt.REPEATS, fmt.STIM_OFFSETS, fmt.STIM_SHAPES)


@dataclass
class RowPlan:
    """Where one stim's valid cells are stored: ``values[starts[i]:ends[i]]`` for ``neurons[i]``."""

    stim: int
    neurons: np.ndarray
    repeats: np.ndarray
    starts: np.ndarray
    ends: np.ndarray

    @property
    def size(self) -> int:
        """Number of values of the row."""
        return int((self.ends - self.starts).sum())

    @property
    def lengths(self) -> np.ndarray:
        return np.where(self.repeats > 0, (self.ends - self.starts) // np.maximum(self.repeats, 1), 0)

    def runs(self) -> list[tuple[int, int, int]]:
        """Maximal runs of cells stored back to back, as ``(start, end, position in the row)``."""
        if not len(self.starts):
            return []
        breaks = np.flatnonzero(self.starts[1:] != self.ends[:-1]) + 1
        first = np.concatenate([[0], breaks])
        last = np.concatenate([breaks - 1, [len(self.starts) - 1]])
        pos = np.concatenate([[0], np.cumsum(self.ends - self.starts)])[first]
        return list(zip(self.starts[first].tolist(), self.ends[last].tolist(), pos.tolist()))


@dataclass
class Index:
    """Per-cell and per-stim index of a source, held in memory once loaded."""

    offsets: np.ndarray       # (S*N+1,) int64: cell (s, n) is values[offsets[s*N+n]:offsets[s*N+n+1]]
    repeats: np.ndarray       # (S, N): repeats per cell, 0 = missing
    stim_offsets: np.ndarray  # (S+1,) int64
    stim_shapes: np.ndarray   # (S, ndim) int64


@dataclass
class _Handles:
    """What one process reads a store through: its storage client and the readers of its arrays."""

    pid: int
    store: StrictStore
    small: dict[str, SmallArray]  # whole reads of deepstrf's small arrays (index, metadata)
    sharded: dict[str, ShardedArray]  # range reads of the sharded data arrays (format 1.1)
    zarr: dict[str, Any] | None = None  # zarr's handles, opened when a read needs them


class SourceReader:
    """Lazy access to one source store's arrays.

    ``arrays_meta`` maps each array's path to its ``zarr.json`` document (from the root's
    consolidated metadata): with it, reading needs no zarr group; without it, the group is
    opened on first read.
    """

    def __init__(self, loc: Location, attrs: dict[str, Any], arrays_meta: dict[str, dict] | None = None) -> None:
        check_source(attrs, arrays_meta, loc.url)  # before anything is sized by what it declares
        self.loc = loc
        self.attrs = attrs
        self.arrays_meta = arrays_meta
        self.n_stims = int(attrs["n_stims"])
        self.n_neurons = int(attrs["n_neurons"])
        self._handles: _Handles | None = None
        self._index: Index | None = None
        self.io_parent: IOCounters | None = None  # also counts this store's reads (a pool's total)
        # the store this source is a version of and the version's path there (set by open_dataset):
        # data found missing is then checked against the versions published (pruned since?)
        self.published: tuple[Location, str] | None = None

    @property
    def url(self) -> str:
        return self.loc.url

    # -- pickling: by URL and metadata, reopened lazily ---------------------------
    def __getstate__(self) -> dict:
        return {"loc": self.loc, "attrs": self.attrs, "arrays_meta": self.arrays_meta, "published": self.published}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["loc"], state["attrs"], state.get("arrays_meta"))
        self.published = state.get("published")

    # -- handles ---------------------------------------------------------------
    def _bound(self) -> _Handles:
        handles = self._handles
        if handles is not None and handles.pid == os.getpid():
            return handles
        with _BIND_LOCK:  # a process's reading threads bind once, and share what they learn
            if self._handles is None or self._handles.pid != os.getpid():  # new, or forked: a new client
                self._handles = self._bind(self._handles)
            return self._handles

    def _bind(self, before: _Handles | None) -> _Handles:
        store = StrictStore(self.loc.zarr_store(read_only=True))
        store.counters.parent = self.io_parent
        zarr_handles = None
        if self.arrays_meta is None:  # a root without consolidated metadata: ask zarr
            zarr_handles = self._lookup(self._zarr_group(store))
            self.arrays_meta = {name: as_written(h.metadata) for name, h in zarr_handles.items()}  # JSON lists
            check_source(self.attrs, self.arrays_meta, self.url)
        remote = not self.loc.is_local
        sharded = {name: reader for name in fmt.SHARDED
                   if (reader := ShardedArray.of(store, name, self.arrays_meta[name], self._cache_name(name), remote))}
        small = {name: reader for name in fmt.ARRAYS
                 if name not in sharded and (reader := SmallArray.of(store, name, self.arrays_meta[name]))}
        if before is not None:  # rebinding (another process): what was learnt of the shards holds
            for name, reader in sharded.items():
                if name in before.sharded:
                    reader.indexes.update(before.sharded[name].indexes)
                    reader.whole = before.sharded[name].whole
        return _Handles(os.getpid(), store, small, sharded, zarr_handles)

    def _zarr_group(self, store: StrictStore) -> zarr.Group:
        try:
            return zarr.open_group(store, mode="r", zarr_format=3)
        except (ValueError, TypeError, KeyError, LookupError) as e:  # zarr's refusals of a damaged document
            raise IntegrityError(f"{self.url}: zarr cannot open the store's group ({type(e).__name__}: {e}); the "
                                 "store is damaged. Re-create it from its source.") from e

    def _lookup(self, group: zarr.Group) -> dict[str, Any]:
        async def lookup():  # one trip to zarr's event loop for every array, not one each
            return await asyncio.gather(*(group._async_group.getitem(name) for name in fmt.ARRAYS),
                                        return_exceptions=True)

        handles = {}
        for name, found in zip(fmt.ARRAYS, sync(lookup())):
            if isinstance(found, KeyError):
                raise IntegrityError(
                    f"{self.url}: array {name!r} is missing from the store; it is damaged or was not "
                    "written by deepstrf. Re-create it from its source.") from None
            if isinstance(found, (ValueError, TypeError, LookupError)):  # zarr refuses the array's document
                raise IntegrityError(f"{self.url}: zarr cannot open array {name!r} ({type(found).__name__}: "
                                     f"{found}); the store is damaged. Re-create it from its source.") from found
            if isinstance(found, BaseException):
                raise found
            handles[name] = found
        return handles

    def _cache_name(self, name: str) -> str:
        """Names array ``name`` in shard caches: URL and content fingerprint, so a store written
        again at the same URL is never served from an older copy."""
        return f"{self.url}#{self.attrs.get('fingerprint', '')}/{name}"

    def count_into(self, parent: IOCounters) -> None:
        """Add this store's future reads in this process to ``parent`` too."""
        self.io_parent = parent
        if self._handles is not None and self._handles.pid == os.getpid():
            self._handles.store.counters.parent = parent

    def io_counters(self) -> tuple[int, int]:
        """``(requests, bytes)`` this process has read from the store (bytes as stored)."""
        if self._handles is None or self._handles.pid != os.getpid():
            return 0, 0  # not opened in this process yet
        return self._handles.store.counters.snapshot()

    def arrays(self) -> dict[str, Any]:
        """zarr's handles of the store's arrays (zarr's group is opened for them on first call)."""
        handles = self._bound()
        if handles.zarr is None:
            with _BIND_LOCK:
                if handles.zarr is None:
                    handles.zarr = self._lookup(self._zarr_group(handles.store))
        return handles.zarr

    def sharded(self) -> dict[str, ShardedArray]:
        """Readers of the arrays stored sharded (format 1.1), by name; empty for a 1.0 store."""
        return self._bound().sharded

    def prepare(self) -> None:
        """Make this process's readers of the store now, ready to read its index (no read when
        the store's metadata is known)."""
        self._ready_for([(name, Ellipsis) for name in INDEX_ARRAYS])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self._meta(name)["data_type"])

    def length(self, name: str) -> int:
        """Length of array ``name`` along its first axis."""
        return int(self._meta(name)["shape"][0])

    def _meta(self, name: str) -> dict[str, Any]:
        self._bound()  # knows every array's metadata once bound
        return self.arrays_meta[name]

    def chunk_length(self, name: str) -> int:
        """Elements per chunk along the first axis (per inner chunk of a sharded array)."""
        sharded = self.sharded().get(name)
        return sharded.layout.chunk if sharded is not None else self.arrays()[name].chunks[0]

    def gather(self, requests: Sequence[tuple[str, Any]]) -> list[Any]:
        """Results of ``array[selection]`` for each ``(name, selection)``, in one concurrent group
        (exceptions returned, not raised). Slices of sharded arrays go through their ShardedArray,
        whole small arrays through their SmallArray, anything else through zarr."""
        self._ready_for(requests)
        handles = self._handles
        if handles.store.reads_here and all(_direct(handles, name, sel) for name, sel in requests):
            return [_outcome(self._read_here, handles, name, sel) for name, sel in requests]
        return sync(self.gather_async(requests))

    @staticmethod
    def _read_here(handles: _Handles, name: str, sel: Any) -> np.ndarray:
        if name in handles.small and sel is Ellipsis:
            return handles.small[name].read_here()
        out = np.empty(max(sel.stop - sel.start, 0), dtype=handles.sharded[name].layout.dtype)
        handles.sharded[name].read_into_here(sel.start, sel.stop, [(sel.start, sel.stop, out)])
        return out

    def _ready_for(self, requests: Sequence[tuple[str, Any]]) -> None:
        """Bind in this process, and open zarr's handles if a request needs them (which cannot be
        done from inside the event loop)."""
        handles = self._bound()
        if not all(_direct(handles, name, sel) for name, sel in requests):
            self.arrays()

    async def gather_async(self, requests: Sequence[tuple[str, Any]]) -> list[Any]:
        """:meth:`gather` in a coroutine; the store must be ready for these requests in this process."""
        handles = self._handles

        def read(name: str, sel: Any):
            if name in handles.sharded and isinstance(sel, slice):
                return handles.sharded[name].read(sel.start, sel.stop)
            if name in handles.small and sel is Ellipsis:
                return handles.small[name].read()
            return handles.zarr[name].getitem(sel)

        return await asyncio.gather(*(read(name, sel) for name, sel in requests), return_exceptions=True)

    def read_whole(self, names: Sequence[str]) -> list[np.ndarray]:
        """Whole arrays, read concurrently; errors name the array."""
        return self._checked_whole(names, self.gather([(n, Ellipsis) for n in names]))

    def _checked_whole(self, names: Sequence[str], results: Sequence[Any]) -> list[np.ndarray]:
        for name, res in zip(names, results):
            if isinstance(res, BaseException):
                raise self.error(res, f"array {name!r}") from res
        return [np.asarray(r) for r in results]

    def error(self, e: BaseException, what: str) -> StoreError:
        if _is_transport_error(e):
            return StoreError(f"{self.url}: reading {what} failed: {type(e).__name__}: {e}. "
                              "Check the connection and credentials, then retry.")
        if (pruned := self.pruned()) is not None:
            return pruned
        return IntegrityError(f"{self.url}: stored data of {what} is corrupt, truncated or missing "
                              f"({type(e).__name__}: {e}). Run `{self.verify_command()}` and "
                              "re-create the store from its source.")

    def verify_command(self) -> str:
        """The command that checks the version read here: with its store, the store's URL and the
        version's fingerprint (a plain ``deepstrf verify STORE`` checks the latest), else the URL read."""
        if self.published is None:
            return f"deepstrf verify {self.url}"
        store, _ = self.published
        return f"deepstrf verify {store.url} --version {self.attrs['fingerprint'].split(':')[-1][:12]}"

    def pruned(self) -> StoreError | None:
        """The error for data found missing if the version read was pruned since it was opened
        (:func:`~deepstrf.store.versions.pruned_since_opened`), else None."""
        if self.published is None:
            return None
        from .versions import pruned_since_opened  # versions reads roots through this module

        store, path = self.published
        if not store.is_local and _in_event_loop():  # an async read's error: listing would need the loop
            return None
        return pruned_since_opened(store, path, self.attrs["fingerprint"])

    # -- metadata and index ------------------------------------------------------
    def read_meta(self) -> tuple[list[dict], list[dict]]:
        stim_raw, nrn_raw = self.read_whole([fmt.STIM_META, fmt.NRN_META])
        out = []
        for name, raw, n in ((fmt.STIM_META, stim_raw, self.n_stims), (fmt.NRN_META, nrn_raw, self.n_neurons)):
            try:
                items = decode_meta(raw.tobytes())
            except (ValueError, KeyError, TypeError) as e:
                raise IntegrityError(f"{self.url}: {name} is not valid metadata JSON ({e}); the store is damaged.") from e
            if len(items) != n:
                raise IntegrityError(f"{self.url}: {name} has {len(items)} entries, expected {n}; the store is damaged.")
            out.append(items)
        return out[0], out[1]

    def has_index(self) -> bool:
        """Whether the cell index is loaded in this process (:meth:`index` reads nothing)."""
        return self._index is not None

    def index(self) -> Index:
        if self._index is None:
            self._set_index(self.read_whole(INDEX_ARRAYS))
        return self._index

    async def load_index_async(self) -> None:
        """Read the index in a coroutine (many stores' indexes in one trip to zarr's event
        loop, see :func:`load_indexes`); :meth:`prepare` must have run in this process."""
        if self._index is None:
            found = await self.gather_async([(name, Ellipsis) for name in INDEX_ARRAYS])
            self._set_index(self._checked_whole(INDEX_ARRAYS, found))

    def _set_index(self, found: list[np.ndarray]) -> None:
        offsets, repeats, stim_offsets, stim_shapes = found
        index = Index(offsets.astype(np.int64, copy=False), repeats.astype(np.int64),
                      stim_offsets.astype(np.int64, copy=False), stim_shapes.astype(np.int64, copy=False))
        problem = (index_problem(index, self.n_stims, self.n_neurons, self.length(fmt.VALUES),
                                 self.length(fmt.STIM_VALUES)) or modality_problem(index.stim_shapes, self.attrs))
        if problem:
            raise IntegrityError(f"{self.url}: the index arrays are inconsistent ({problem}); the store is "
                                 "damaged. Re-create it from its source.")
        self._index = index

    def learn_shard_layout(self) -> None:
        """:meth:`learn_shard_layout_async` for this store alone."""
        self._bound()
        sync(self.learn_shard_layout_async())

    async def learn_shard_layout_async(self) -> None:
        """Read the index of each data array's first shard (object stores only): it tells
        whether this store's shards are fetched whole (see :class:`ShardedArray`) before the
        first read needs to know, and processes forked afterwards inherit the answer. The
        store must be bound in this process already."""
        probes = [s for s in self._handles.sharded.values() if s.whole is None and s.layout.length]
        found = await asyncio.gather(*(s.shard_index(0) for s in probes), return_exceptions=True)
        for probe, result in zip(probes, found):
            if isinstance(result, BaseException):
                raise self.error(result, f"the first shard index of {probe.prefix}") from result

    def mask(self) -> np.ndarray:
        """``(S, N)`` bool: True where the cell holds data (reads only ``repeats`` when the index
        is not loaded: pooling 10^4 sources needs their masks, not their indexes)."""
        if self._index is not None:
            return self._index.repeats > 0
        (repeats,) = self.read_whole([fmt.REPEATS])
        if repeats.shape != (self.n_stims, self.n_neurons):
            raise IntegrityError(f"{self.url}: {fmt.REPEATS} has shape {repeats.shape}, expected "
                                 f"{(self.n_stims, self.n_neurons)}; the store is damaged. Re-create it from its source.")
        return repeats > 0

    # -- data --------------------------------------------------------------------
    def read_stim(self, s: int) -> np.ndarray:
        return self.read_stims([s])[0]

    def read_stims(self, stims: Sequence[int]) -> list[np.ndarray]:
        """Stimuli ``stims`` (shaped, stored dtype), fetched in one concurrent group of coalesced range reads."""
        idx = self.index()
        ids = np.asarray(list(stims), dtype=np.int64)
        starts, ends = idx.stim_offsets[ids], idx.stim_offsets[ids + 1]
        dtype = self.dtype(fmt.STIM_VALUES)
        out = [np.empty(int(n), dtype=dtype) for n in (ends - starts).tolist()]
        self.read_ranges(fmt.STIM_VALUES, starts, ends, out,
                         lambda e, a, b: self.error(e, f"stims {ids.tolist()} ({fmt.STIM_VALUES}[{a}:{b}])"))
        return [x.reshape(tuple(idx.stim_shapes[s])) for x, s in zip(out, ids.tolist())]

    def read_ranges(self, name: str, starts: Sequence[int], ends: Sequence[int], dests: Sequence[np.ndarray],
                    error: Callable[[BaseException, int, int], StoreError]) -> None:
        """Read ``[starts[i], ends[i])`` of array ``name`` into ``dests[i]``.

        All spans are fetched in one concurrent group: for a sharded array one
        span per shard holding any range, read and decoded straight into
        ``dests`` as :meth:`ShardedArray.read_into` does; otherwise ranges
        sharing or touching a chunk make a span.
        Raises ``error(exc, a, b)`` for the first span whose read failed.
        """
        targets = sorted(((int(a), int(b), d) for a, b, d in zip(starts, ends, dests) if b > a),
                         key=lambda t: t[0])
        sharded = self.sharded().get(name)
        array = self.arrays()[name] if sharded is None else None  # a format 1.0 store: zarr reads it
        spans = sharded.layout.by_shard(targets) if sharded is not None else _coalesce(targets, array.chunks[0])

        if sharded is not None and self._handles.store.reads_here:  # local files: no event loop
            for a, b, inside in spans:
                if isinstance(res := _outcome(sharded.read_into_here, a, b, inside), BaseException):
                    raise error(res, a, b) from res
            return

        async def read(a: int, b: int, inside: list[Target]) -> None:
            if sharded is not None:
                return await sharded.read_into(a, b, inside)
            data = await array.getitem(slice(a, b))
            for x, y, dest in inside:
                dest[...] = data[x - a:y - a]

        async def run():
            return await asyncio.gather(*(read(*span) for span in spans), return_exceptions=True)

        for (a, b, _), res in zip(spans, sync(run())):
            if isinstance(res, BaseException):
                raise error(res, a, b) from res

    def warmer(self, stims: Sequence[int]) -> Coroutine[Any, Any, Any] | None:
        """A coroutine that has the shards reading ``stims`` needs (their stimuli and whole
        response rows) cached, where shards are fetched whole (:meth:`ShardedArray.warm`); None
        while the index is not loaded here (the read loads it). Failures are left to the read
        that follows, which reports them. Made outside the event loop it runs in."""
        if not self.has_index():
            return None
        idx, sharded = self.index(), self.sharded()
        ids = np.asarray(list(stims), dtype=np.int64)
        rows = ids * self.n_neurons
        spans = {fmt.STIM_VALUES: (idx.stim_offsets[ids], idx.stim_offsets[ids + 1]),
                 fmt.VALUES: (idx.offsets[rows], idx.offsets[rows + self.n_neurons])}
        ranges = [(sharded[name], a, b) for name, (starts, ends) in spans.items() if name in sharded
                  for a, b in zip(starts.tolist(), ends.tolist()) if b > a]

        async def warm() -> None:
            await asyncio.gather(*(array.warm(a, b) for array, a, b in ranges), return_exceptions=True)

        return warm()

    def row_plan(self, stims: Sequence[int], neurons: Sequence[int] | None = None) -> list[RowPlan]:
        """Where the valid cells of each stim among ``neurons`` (all by default) are stored."""
        idx = self.index()
        N = self.n_neurons
        nrn = np.arange(N, dtype=np.int64) if neurons is None else np.asarray(list(neurons), dtype=np.int64)
        plans = []
        for s in stims:
            keep = nrn[idx.repeats[s, nrn] > 0] if nrn.size else nrn
            ids = s * N + keep
            plans.append(RowPlan(int(s), keep, idx.repeats[s, keep], idx.offsets[ids], idx.offsets[ids + 1]))
        return plans

    def read_rows(self, stims: Sequence[int], neurons: Sequence[int] | None = None,
                  out: Sequence[np.ndarray] | None = None) -> list[RawRow]:
        """Valid cells of each stim in ``stims`` among ``neurons`` (all by default), in stored dtype.

        All needed byte ranges are fetched in one concurrent group (see
        :meth:`read_ranges`). With
        ``out`` (one 1-D array per stim, of :meth:`row_plan` ``.size``
        elements, any dtype), row ``i`` is decoded into ``out[i]``, which
        becomes its ``values``.
        """
        plans = self.row_plan(stims, neurons)
        dtype = self.dtype(fmt.VALUES)
        if out is None:
            out = [np.empty(p.size, dtype=dtype) for p in plans]
        else:
            check_out(out, [p.size for p in plans])
        starts, ends, dests = [], [], []
        for plan, buf in zip(plans, out):
            for a, b, pos in plan.runs():
                starts.append(a)
                ends.append(b)
                dests.append(buf[pos:pos + b - a])
        self.read_ranges(fmt.VALUES, starts, ends, dests, self.cell_error)
        return [RawRow(stim=p.stim, neurons=p.neurons, repeats=p.repeats, lengths=p.lengths, values=buf)
                for p, buf in zip(plans, out)]

    def cell_error(self, e: BaseException, a: int, b: int) -> StoreError:
        """Error for a failed read of values[a:b], naming the bad chunk(s) and the cells they hold."""
        if _is_transport_error(e):
            return self.error(e, f"{fmt.VALUES}[{a}:{b}]")
        if (pruned := self.pruned()) is not None:
            return pruned
        C, L = self.chunk_length(fmt.VALUES), self.length(fmt.VALUES)
        chunks = list(range(a // C, (b - 1) // C + 1))
        results = self.gather([(fmt.VALUES, slice(k * C, min((k + 1) * C, L))) for k in chunks])
        bad = [k for k, r in zip(chunks, results) if isinstance(r, BaseException)] or chunks
        cells = describe_cells(self.index(), self.n_neurons, bad[0] * C, min((bad[-1] + 1) * C, L))
        sharded = self.sharded().get(fmt.VALUES)
        names = [sharded.chunk_name(k) if sharded else f"c/{k}" for k in bad]
        return IntegrityError(
            f"{self.url}: stored responses are corrupt, truncated or missing in {fmt.VALUES} chunk(s) "
            f"{', '.join(names)} holding {cells} ({type(e).__name__}: {e}). "
            f"Run `{self.verify_command()}` and re-create the store from its source.")


def _in_event_loop() -> bool:
    """Whether this thread is running an event loop (where fsspec's blocking calls are refused)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _coalesce(targets: Sequence[Target], chunk: int) -> list[tuple[int, int, list[Target]]]:
    """Group targets (sorted by start) that share or touch a chunk into spans ``(a, b, targets)``."""
    spans: list[tuple[int, int, list[Target]]] = []
    for t in targets:
        x, y, _ = t
        if spans and x // chunk <= (spans[-1][1] - 1) // chunk + 1:
            a, b, inside = spans[-1]
            inside.append(t)
            spans[-1] = (a, max(b, y), inside)
        else:
            spans.append((x, y, [t]))
    return spans


def index_problem(idx: Index, S: int, N: int, n_values: int, n_stim_values: int) -> str | None:
    """A description of the first inconsistency in the index arrays, or None."""
    off, reps = idx.offsets, idx.repeats
    if off.shape != (S * N + 1,) or reps.shape != (S, N):
        return f"offsets has shape {off.shape}, repeats {reps.shape}; expected ({S * N + 1},) and ({S}, {N})"
    counts = np.diff(off)
    if off[0] != 0 or (counts < 0).any() or off[-1] != n_values:
        return f"offsets must rise from 0 to len(values)={n_values}"
    r = reps.reshape(-1)
    if (r < 0).any() or (counts[r == 0] != 0).any() or (counts[r > 0] % r[r > 0] != 0).any():
        return "a cell's value count is not a multiple of its repeat count"
    so, shapes = idx.stim_offsets, idx.stim_shapes
    if so.shape != (S + 1,) or shapes.shape[0] != S:
        return f"stims/offsets has shape {so.shape}, stims/shapes {shapes.shape}; expected ({S + 1},) and ({S}, ndim)"
    if so[0] != 0 or so[-1] != n_stim_values or not np.array_equal(np.diff(so), shapes.prod(axis=1)):
        return "stims/offsets does not match stims/shapes and len(stims/values)"
    return None


def modality_problem(shapes: np.ndarray, attrs: dict[str, Any], first: int = 0) -> str | None:
    """A description of the first stimulus shape that contradicts the attributes (audio (C, F, T),
    video (C, H, W, T)), or None; ``first``: the index of the stimulus of ``shapes``' first row."""
    sizes = {"audio": ("F",), "video": ("H", "W")}.get(attrs.get("kind"), ())
    if not sizes or not len(shapes):
        return None
    want = np.array([attrs[key] for key in sizes])
    bad = (np.flatnonzero((shapes[:, 1:len(sizes) + 1] != want).any(axis=1)) if shapes.shape[1] == len(sizes) + 2
           else [0])
    if not len(bad):
        return None
    return (f"stims[{first + bad[0]}] has shape {tuple(int(n) for n in shapes[bad[0]])}, not the "
            f"(C, {', '.join(f'{key}={attrs[key]}' for key in sizes)}, T) of the attributes")


def describe_cells(idx: Index, N: int, a: int, b: int) -> str:
    """Human description of the cells overlapping values[a:b], e.g. ``stim 3 neurons 10-14``."""
    first = int(np.searchsorted(idx.offsets, a, side="right") - 1)
    last = int(np.searchsorted(idx.offsets, b, side="left") - 1)
    first, last = max(first, 0), max(last, first)
    s0, n0 = divmod(first, N)
    s1, n1 = divmod(last, N)
    if s0 == s1:
        return f"stim {s0} neuron{'s' if n1 > n0 else ''} {n0}{f'-{n1}' if n1 > n0 else ''}"
    return f"stims {s0}-{s1} (from stim {s0} neuron {n0} to stim {s1} neuron {n1})"
