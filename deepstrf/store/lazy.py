"""Pooled sources opened on first read, by the process that reads them.

A format-2 pool holds everything needed to open, select and plan reading
(shapes, metadata, coverage), so opening it opens no source. Each source is a
:class:`SourceHandle`; its stims and responses are views
(:class:`LazySourceStims`, :class:`LazySourceGrid`) that open the source store
on their first data read, check its fingerprint there (a missing or changed
source is an error naming it), and keep at most :data:`MAX_OPEN_SOURCES` opened
per process (least recently used first out), so an epoch over 10^4 sources
stays within bounded memory.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..datasets.coverage import Coverage
from ..datasets.neural_dataset import NeuralDataset
from ..datasets.views import (BlockDiagonalGrid, LazySequence, RawRow, ResponseGrid, raw_row_sizes, read_many,
                              read_raw_rows, read_row)
from ..errors import (SourceChangedError, SourceUnreadableError, StoreError, StoreNotFoundError,
                      VersionNotFoundError, environment_errors, unreadable)
from ..forksafe import thread_map
from .dataset import source_readers
from .integrity import IOCounters
from .location import on_network
from .versions import listing
from .writer import dataset_kind

MAX_OPEN_SOURCES = 256
"""Sources kept open per process; an epoch's block-shuffled windows touch far fewer at a time."""
EAGER_CHECK_MAX_SOURCES = 64
"""Pools with at most this many sources open and check all of them when the pool is opened."""


class SourceChangedWarning(UserWarning):
    """A pooled source changed after pooling and the caller accepted it."""


class _OpenSources:
    """LRU of the handles holding an opened source in this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handles: OrderedDict[int, SourceHandle] = OrderedDict()

    def touch(self, handle: "SourceHandle") -> None:
        with self._lock:
            self._handles[id(handle)] = handle
            self._handles.move_to_end(id(handle))
            while len(self._handles) > MAX_OPEN_SOURCES:
                _, oldest = self._handles.popitem(last=False)
                oldest.close()

    def after_fork(self) -> None:
        self._lock = threading.Lock()


OPEN_SOURCES = _OpenSources()
os.register_at_fork(after_in_child=OPEN_SOURCES.after_fork)


class SourceHandle:
    """One pooled source: its pool entry, opened on first :meth:`dataset` call in a process."""

    def __init__(self, pool_url: str, entry: dict[str, Any], opener: Callable[[str], NeuralDataset],
                 io: IOCounters, accept_changed: bool = False, pooled: dict[str, Any] | None = None) -> None:
        self.pool_url = pool_url
        self.entry = entry
        self.pooled = pooled or {}  # what the pool says of the source (bin width, kind, F...): a changed one must match
        self.opener = opener
        self.io = io  # the pool's total of requests and bytes, over the sources opened here
        self.accept_changed = accept_changed
        self.remote = on_network(entry["url"])  # its reads wait on a network
        self._ds: NeuralDataset | None = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.entry["name"]

    @property
    def url(self) -> str:
        return self.entry["url"]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_ds": None, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def is_open(self) -> bool:
        return self._ds is not None

    def dataset(self) -> NeuralDataset:
        """The opened source store (opened now if needed, fingerprint checked)."""
        ds = self._ds
        if ds is None:
            with self._lock:
                if self._ds is None:
                    self._ds = self._open()
                ds = self._ds
        OPEN_SOURCES.touch(self)
        return ds

    def close(self) -> None:
        self._ds = None

    def _open(self) -> NeuralDataset:
        e = self.entry
        ds = open_pinned(self.opener, self.pool_url, e, self.accept_changed)
        check_fingerprint(self.pool_url, e, ds, self.accept_changed, self.pooled)
        for reader in source_readers(ds) or []:
            reader.count_into(self.io)
        return ds


def open_pinned(opener: Callable[..., NeuralDataset], pool_url: str, entry: dict,
                accept_changed: bool) -> NeuralDataset:
    """The version of a pooled source that the pool pinned: its version group, or (pools written
    before versions, sources pooled before their first re-publish) its fingerprint.

    A pin the store no longer holds (pruned) is an error naming the source, the pin and the
    versions the store holds; with ``accept_changed`` the latest version opens instead (and
    :func:`check_fingerprint` warns). An unversioned store written again in place opens as it
    is, for :func:`check_fingerprint` to report. A source that is missing, or whose store refuses
    or fails the reads (credentials, endpoint), is an error naming it, its URL and what to do.
    """
    try:
        return _open_pin(opener, pool_url, entry, accept_changed)
    except (VersionNotFoundError, SourceChangedError):
        raise
    except StoreNotFoundError as e:
        raise StoreNotFoundError(
            f"pool {pool_url}: source {entry['name']!r} is missing at {entry['url']} (reference "
            f"{entry['ref']!r}); restore it there or rewrite the pool. ({e})") from e
    except SourceUnreadableError as e:  # open_dataset names the URL only
        raise SourceUnreadableError(f"pool {pool_url}: source {entry['name']!r} at {e}") from e.__cause__
    except StoreError:
        raise
    except environment_errors() as e:
        raise SourceUnreadableError(
            f"pool {pool_url}: source {entry['name']!r} at {unreadable(entry['url'], e)}") from e


def _open_pin(opener: Callable[..., NeuralDataset], pool_url: str, entry: dict,
              accept_changed: bool) -> NeuralDataset:
    pin = entry.get("version") or entry["fingerprint"]
    try:
        try:
            return opener(entry["url"], version=pin)
        except VersionNotFoundError:
            if pin == entry["fingerprint"]:
                raise
            return opener(entry["url"], version=entry["fingerprint"])  # the same content, published again
    except VersionNotFoundError as e:
        if accept_changed or not e.versioned:
            return opener(entry["url"])
        raise VersionNotFoundError(
            f"pool {pool_url}: source {entry['name']!r} at {entry['url']} is pinned to version "
            f"{entry['fingerprint']} ({entry.get('version') or 'the store as pooled'}), which the store no longer "
            f"holds (pruned?); it holds {listing(e.versions)}. Re-pin the pool to the latest versions with "
            f"`deepstrf pool-update {pool_url} NEW_POOL` (in Python, opening it with accept_changed_sources=True "
            "reads the latest instead, where its shape, bin width and stimulus geometry are the ones pooled).",
            e.versions, True) from e


def check_fingerprint(pool_url: str, entry: dict, src: NeuralDataset, accept: bool,
                      pooled: dict[str, Any] | None = None) -> bool:
    """True if the source is as pooled; warn (``accept``) or raise if it changed. A changed source
    is read into the pool only where the pool's description of it still holds: its shape and what
    ``pooled`` records (bin width, kind, F / frame size), else it is refused."""
    if src.fingerprint == entry["fingerprint"]:
        return True
    msg = (f"pool {pool_url}: source {entry['name']!r} at {entry['url']} changed after pooling "
           f"(fingerprint {src.fingerprint}, pooled {entry['fingerprint']})")
    if not accept:
        raise SourceChangedError(
            f"{msg}. Rewrite the pool with deepstrf concat, or, if the change is intended, open it in Python "
            "with accept_changed_sources=True (the command line has no such option).")
    differences = _differences(src, entry, pooled or {})
    if differences:
        raise SourceChangedError(f"{msg}, and its {', '.join(differences)} changed too, so the pool cannot be read "
                                 f"with it. Re-pin the pool to the latest versions: `deepstrf pool-update {pool_url} "
                                 "NEW_POOL` (its sources must then agree on bin width and stimulus geometry).")
    warnings.warn(msg, SourceChangedWarning, stacklevel=4)
    return False


def _differences(src: NeuralDataset, entry: dict, pooled: dict[str, Any]) -> list[str]:
    """What of ``src`` differs from the pool's description of it, each as ``name now (pooled was)``."""
    found = {"shape": (src.get_S(), src.N_neurons), "kind": dataset_kind(src)}
    recorded = {"shape": (entry["n_stims"], entry["n_neurons"]), **pooled}
    out = []
    for key, was in recorded.items():
        now = found[key] if key in found else getattr(src, key, None)
        if now != was:
            out.append(f"shape {now[0]} x {now[1]} (pooled {was[0]} x {was[1]})" if key == "shape"
                       else f"{key} {now!r} (pooled {was!r})")
    return out


class LazySourceStims(LazySequence):
    """A pooled source's stimuli: reads open the source."""

    def __init__(self, handle: SourceHandle) -> None:
        super().__init__(handle.entry["n_stims"])
        self.handle = handle
        self.waits_on_network = handle.remote

    def _get(self, i: int) -> torch.Tensor:
        return self.handle.dataset().stims[i]

    def _get_many(self, indices: Sequence[int]) -> list[torch.Tensor]:
        return read_many(self.handle.dataset().stims, indices)


class LazySourceGrid(ResponseGrid):
    """A pooled source's responses: its coverage comes from the pool, reads open the source."""

    def __init__(self, handle: SourceHandle, coverage: Callable[[], Coverage]) -> None:
        super().__init__(handle.entry["n_stims"], handle.entry["n_neurons"])
        self.handle = handle
        self.waits_on_network = handle.remote
        self._stored_coverage = coverage

    def _read_row(self, s: int, neurons: Sequence[int]) -> list[torch.Tensor]:
        return read_row(self.handle.dataset().responses, s, neurons)

    def _read_raw_rows(self, stims: Sequence[int], neurons: Sequence[int] | None,
                       out: Sequence[np.ndarray] | None) -> list[RawRow]:
        return read_raw_rows(self.handle.dataset().responses, stims, neurons, out)

    def _row_sizes(self, stims: Sequence[int], neurons: Sequence[int] | None) -> tuple[np.ndarray, np.dtype] | None:
        return raw_row_sizes(self.handle.dataset().responses, stims, neurons)

    def row_sizes_read_storage(self) -> bool:
        source = self.opened_source()  # None: sizing opens the source
        return source is None or (isinstance(source.responses, ResponseGrid)
                                  and source.responses.row_sizes_read_storage())

    def _coverage(self) -> Coverage:
        return self._stored_coverage()

    def opened_source(self) -> NeuralDataset | None:
        """The source's dataset if it is open in this process (none is opened here)."""
        return self.handle._ds if self.handle.is_open() else None

    def opened_readers(self) -> list[Any]:
        """Store readers of the source if it is open in this process (none are opened here)."""
        source = self.opened_source()
        return (source_readers(source) or []) if source is not None else []


def open_now(ds: NeuralDataset) -> None:
    """Open (and check) every lazily opened source behind ``ds`` now, concurrently: a missing or
    changed source fails here, reading starts at once, and processes forked afterwards inherit
    the opened sources."""
    grid = ds.responses
    if isinstance(grid, BlockDiagonalGrid):
        handles = [p.responses.handle for p in grid.sources if isinstance(p.responses, LazySourceGrid)]
        thread_map(SourceHandle.dataset, handles, max_workers=16, name="deepstrf-open")
