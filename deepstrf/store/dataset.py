"""``open_dataset``: a store-backed, lazy deepSTRF-compatible dataset.

The dataset is an ordinary ``AudioNeuralDataset`` / ``VideoNeuralDataset`` /
``NeuralDataset`` whose ``stims`` is a :class:`ZarrStims` and whose
``responses`` is a :class:`ZarrResponseGrid`; both read through one
:class:`~deepstrf.store.reader.SourceReader` on access.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from ..datasets.audio import AudioNeuralDataset
from ..datasets.metatable import MetaTable
from ..datasets.neural_dataset import DatasetValidationError, NeuralDataset
from ..datasets.video import VideoNeuralDataset
from ..datasets.views import BlockDiagonalGrid, LazySequence, RawRow, ResponseGrid, missing_sentinel
from ..errors import IntegrityError, StoreError, reading_store
from ..forksafe import run_gated
from . import format as fmt
from .location import Location, on_network
from .options import StorageOptions
from .reader import SourceReader, consolidated_arrays, read_root, sync
from .versions import VERSIONS_DIR, is_versioned, open_path, open_version

_CLASSES: dict[str, type[NeuralDataset]] = {
    "audio": AudioNeuralDataset, "video": VideoNeuralDataset, "neural": NeuralDataset}


class ZarrStims(LazySequence):
    """``stims[s]`` read from the store on access, as a tensor of the stored dtype."""

    def __init__(self, reader: SourceReader) -> None:
        super().__init__(reader.n_stims)
        self.reader = reader
        self.waits_on_network = on_network(reader.url)  # read with its neighbours at once (views.map_parts)

    def _get(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.reader.read_stim(i))

    def _get_many(self, indices: Sequence[int]) -> list[torch.Tensor]:
        return [torch.from_numpy(x) for x in self.reader.read_stims(indices)]


class ZarrResponseGrid(ResponseGrid):
    """``responses[s][n]`` read from the store: float tensors ``(R, T)`` or the NaN sentinel."""

    def __init__(self, reader: SourceReader) -> None:
        super().__init__(reader.n_stims, reader.n_neurons)
        self.reader = reader
        self.waits_on_network = on_network(reader.url)
        self.read_dtype = fmt.read_dtype(np.dtype(reader.attrs["response_dtype"]))

    def _read_row(self, s: int, neurons: Sequence[int]) -> list[torch.Tensor]:
        (row,) = self.reader.read_rows([s], neurons)
        values = torch.from_numpy(np.asarray(row.values, dtype=self.read_dtype))
        cells, pos = {}, 0
        for n, r, t in zip(row.neurons.tolist(), row.repeats.tolist(), row.lengths.tolist()):
            cells[n] = values[pos:pos + r * t].view(r, t)
            pos += r * t
        return [cells[n] if n in cells else missing_sentinel() for n in neurons]

    def _read_raw_rows(self, stims: Sequence[int], neurons: Sequence[int] | None,
                       out: Sequence[np.ndarray] | None) -> list[RawRow]:
        """Valid cells of several stims in one concurrent read (decoded into ``out`` if given);
        values keep the stored dtype."""
        return self.reader.read_rows(stims, neurons, out)

    def _row_sizes(self, stims: Sequence[int], neurons: Sequence[int] | None) -> tuple[np.ndarray, np.dtype]:
        sizes = np.array([p.size for p in self.reader.row_plan(stims, neurons)], dtype=np.int64)
        return sizes, self.reader.dtype(fmt.VALUES)

    def row_sizes_read_storage(self) -> bool:
        return not self.reader.has_index()

    def _stored_signature(self) -> str:
        return f"store {self.reader.attrs['fingerprint']}"

    def _mask(self) -> torch.Tensor:
        return torch.from_numpy(self.reader.mask())


def source_readers(ds: NeuralDataset) -> list[SourceReader] | None:
    """The readers of the source stores behind ``ds`` (a pool's sources in order; of a
    format-2 pool, those opened in this process so far); None if any part of ``ds`` is not
    store-backed."""
    grid = ds.responses
    if isinstance(grid, ZarrResponseGrid):
        return [grid.reader]
    if hasattr(grid, "opened_readers"):  # a pooled source opened on first read (store.lazy)
        return grid.opened_readers()
    if isinstance(grid, BlockDiagonalGrid):
        parts = [source_readers(d) for d in grid.sources]
        if all(p is not None for p in parts):
            return [r for p in parts for r in p]
    return None


def warm_reads(ds: NeuralDataset, stims: Sequence[int]) -> None:
    """Fetch, and wait for, the whole shards (object stores) that reading ``stims`` of ``ds``
    will need, without decoding them: the read that follows finds them cached (in this
    process, and in the shard directory it shares with others, if any). Covers the
    store-backed parts of ``ds`` open in this process (a pool's sources); nothing else. Whole
    response rows are covered whatever the neuron selection."""
    prepared = [w for w in _warmers(ds, list(stims)) if w is not None]

    async def warm() -> None:
        await asyncio.gather(*prepared)

    if prepared:
        run_gated(sync, warm())


def _warmers(ds: NeuralDataset, stims: list[int]) -> Iterator[Any]:
    grid = ds.responses
    if isinstance(grid, ZarrResponseGrid):
        yield grid.reader.warmer(stims)
    elif hasattr(grid, "opened_source"):  # a pooled source opened on first read (store.lazy): not here
        if (source := grid.opened_source()) is not None:
            yield from _warmers(source, stims)
    elif isinstance(grid, BlockDiagonalGrid):
        by_source: dict[int, list[int]] = {}
        for s in stims:
            k = grid.source_of_stim(s)
            by_source.setdefault(k, []).append(s - grid.stim_offsets[k])
        for k, local in by_source.items():
            yield from _warmers(grid.sources[k], local)


def storage_io(ds: NeuralDataset) -> tuple[int, int] | None:
    """``(requests, bytes as stored)`` read so far in this process by a store-backed dataset,
    summed over a pool's sources; None if any part of ``ds`` is not store-backed."""
    total = getattr(ds.responses, "io", None)
    if total is not None:  # a format-2 pool counts its sources' reads itself: O(1), whatever K
        return total.snapshot()
    readers = source_readers(ds)
    if readers is None:
        return None
    counts = [r.io_counters() for r in readers]
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def load_indexes(ds: NeuralDataset, stim_meta: bool = False) -> None:
    """Read the cell index (and, on object stores, the shard layout) of every source store
    behind ``ds`` that is open in this process, in one concurrent batch: before forking
    DataLoader workers, which then share them instead of each reading them before its first
    batch. With ``stim_meta``, the stim metadata too (a pool reads its table on first use;
    every streamed batch carries its items' rows), read meanwhile in a thread."""
    readers = source_readers(ds) or []
    for reader in readers:
        reader.prepare()

    async def load() -> None:
        await asyncio.gather(*(r.load_index_async() for r in readers))
        await asyncio.gather(*(r.learn_shard_layout_async() for r in readers))

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="deepstrf-meta") as meta:
        table = meta.submit(run_gated, ds.stim_meta.__getitem__, 0) if stim_meta and len(ds.stim_meta) else None
        if readers:
            run_gated(sync, load())
        if table is not None:
            table.result()


def open_source(loc: Location, root: dict[str, Any], *, lazy_metadata: bool = False, **kw: Any) -> NeuralDataset:
    """Open a ``deepstrf.source`` store, given its root ``zarr.json`` document, as a lazy dataset
    of the recorded kind.

    ``lazy_metadata`` reads ``stim_meta`` / ``nrn_meta`` on first use instead of now (a pool
    that opens a source to read its data already holds its metadata).
    """
    if kw:
        raise TypeError(f"open_dataset: unexpected keyword argument(s) {sorted(kw)} for the source store {loc.url}")
    attrs = dict(root.get("attributes") or {})
    fmt.check_format(attrs, loc.url, fmt.SOURCE_FORMAT)
    reader = SourceReader(loc, attrs, consolidated_arrays(root))
    if lazy_metadata:
        metas = functools.cache(reader.read_meta)
        stim_meta = MetaTable.from_rows(reader.n_stims, lambda: metas()[0], "stim_meta")
        nrn_meta = MetaTable.from_rows(reader.n_neurons, lambda: metas()[1], "nrn_meta")
    else:
        stim_meta, nrn_meta = reader.read_meta()
    kind = attrs.get("kind")
    if kind not in _CLASSES:
        raise StoreError(f"{loc.url}: unknown dataset kind {kind!r} (expected one of {list(_CLASSES)})")
    cls = _CLASSES[kind]  # chosen from the kind attribute; class_name is metadata only
    ds = cls.__new__(cls)
    NeuralDataset.__init__(ds, path=loc.url, dt_ms=attrs["dt_ms"])
    if kind == "audio":
        hr = attrs.get("hearing_range_hz")
        ds.F, ds.audio_fs, ds.hearing_range_hz = attrs["F"], attrs.get("audio_fs"), None if hr is None else tuple(hr)
    elif kind == "video":
        ds.H, ds.W = attrs["H"], attrs["W"]
    ds.N_neurons = reader.n_neurons
    ds.stim_meta, ds.nrn_meta = stim_meta, nrn_meta
    ds.stims = ZarrStims(reader)
    ds.responses = ZarrResponseGrid(reader)
    if attrs.get("name"):
        ds.name = attrs["name"]
    ds.card = attrs.get("card")
    ds.class_name = attrs.get("class_name")
    ds.store_url = loc.url
    ds.storage_options = loc.storage_options
    ds.fingerprint = attrs["fingerprint"]
    try:
        ds.validate()
    except DatasetValidationError as e:
        raise IntegrityError(f"{loc.url}: the store's attributes do not describe a valid dataset ({e}); the "
                             "store is damaged. Re-create it from its source.") from e
    return ds


OPENERS: dict[str, Callable[..., NeuralDataset]] = {fmt.SOURCE_FORMAT: open_source}


def open_dataset(url: str | os.PathLike, *, storage_options: StorageOptions = None, version: str | None = None,
                 **kw: Any) -> NeuralDataset:
    """Open the deepstrf store at ``url`` as a lazy dataset (data read on access).

    ``storage_options`` go to fsspec (e.g. ``{"client_kwargs": {"endpoint_url": ...}}``
    for S3), or map URL prefixes to such options (``{"s3://lab-a": {...}, "s3://lab-b":
    {...}}``, the longest prefix wins; a pool's sources are resolved the same way);
    they are kept in memory only. A source store opens at its latest version, or at
    ``version``: a fingerprint, a unique prefix of one, or a tag given at save time
    (``deepstrf versions URL`` lists them). Opening reads the consolidated root
    metadata and the stim/neuron metadata; the index is read on first use. A store whose reads
    fail (network, endpoint, credentials) is a :class:`SourceUnreadableError` naming its URL and
    the options to check.
    """
    if version is not None and not isinstance(version, str):
        raise TypeError(f"open_dataset: version must be a str (a fingerprint, a prefix of one, or a tag), got "
                        f"{type(version).__name__} {version!r}; pass str(version)")
    loc = Location.parse(url, storage_options)
    with reading_store(loc.url):
        return _open(loc, version, **kw)


def _open(loc: Location, version: str | None, **kw: Any) -> NeuralDataset:
    """:func:`open_dataset` of ``loc``, the errors of its file system, network or client as they are."""
    if version and version.startswith(f"{VERSIONS_DIR}/"):  # a pool's pin: the version's group, no listing
        where, root = open_path(loc, version)
        path = version
    else:
        root = read_root(loc)
        where, path = loc, ""
        if version is not None or is_versioned(root):
            where, root, chosen = open_version(loc, root, version)
            path = chosen.path
    attrs = root.get("attributes") or {}
    fmt.check_format(attrs, where.url, expected=None, supported=(*fmt.POOL_SUPPORTED_MAJORS, fmt.SUPPORTED_MAJOR))
    opener = OPENERS.get(attrs["format"])
    if opener is None:
        raise StoreError(f"{loc.url} holds a {attrs['format']!r} group, which this version of deepstrf "
                         "cannot open. Upgrade deepstrf.")
    ds = opener(where, root, **kw)  # each opener checks its own format's versions
    if attrs["format"] == fmt.SOURCE_FORMAT:
        ds.store_url, ds.version_path = loc.url, path  # pools refer to the store and pin the version
        for reader in source_readers(ds) or []:
            reader.published = (loc, path)
    return ds


def opened_version(ds: NeuralDataset) -> str | None:
    """The ``version`` that makes :func:`open_dataset` open exactly the version of the source store
    ``ds`` was opened at, wherever and whenever it is opened again: its version group, or the
    fingerprint of a store's first content (path ``""``, which a later publish leaves at the root);
    None for what is not an opened source store (a pool pins its sources itself)."""
    path = getattr(ds, "version_path", None)
    if path is None or getattr(ds, "store_url", None) is None:
        return None
    return path or ds.fingerprint
