"""Pool stores: a concatenation written as references plus its coverage (format 2).

A pool group copies no stimulus or response data. It records, per source, a
reference (relative when under the pool's root), the source's fingerprint,
shape, kind and dataset card; the pooled stim and neuron metadata as column
tables; and the coverage as block-sparse bits (only the blocks in which some
pair was not recorded). Everything is read in a constant number of requests
whatever the number of sources K, and no source is opened until its data is
read (:mod:`deepstrf.store.lazy`). ``docs/format.md`` describes the layout.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import zarr
from zarr.core.group import AsyncGroup
from zarr.storage import StorePath

from ..datasets.concat import concat_datasets, default_name
from ..datasets.coverage import Coverage
from ..datasets.metatable import MetaSlice, MetaTable
from ..datasets.neural_dataset import NeuralDataset
from ..bulk import gc_paused
from ..datasets.views import BlockDiagonalGrid, ConcatSequence, LazySequence, MappedSequence, ResponseGrid
from ..errors import IntegrityError
from . import format as fmt
from .atomic import consolidate, staged_write
from .dataset import _CLASSES, OPENERS, open_dataset
from .direct import SmallArray
from .integrity import IOCounters, MissingChunk, StrictStore, array_digest, content_hasher, fingerprint, update
from .jsonmeta import decode_columns, encode_columns
from .lazy import EAGER_CHECK_MAX_SOURCES, LazySourceGrid, LazySourceStims, SourceChangedWarning, SourceHandle, open_now
from .location import Location
from .options import StorageOptions, location_prefix, options_for, options_from, options_key
from .reader import group_of, open_group, sync
from .schema import as_written, check_array, check_pool_attributes, check_pool_entries
from .references import make_reference, pool_root, resolve_reference
from .writer import dataset_kind

__all__ = ["PoolGrid", "SourceChangedWarning", "open_pool", "pool_card", "write_pool"]

POOL_FORMAT = "deepstrf.pool"
POOL_TOP_LEVEL = ("coverage", "index", "tables")
MODALITY_ATTRS = ("F", "audio_fs", "H", "W")
# format 2: per-source entries and metadata as JSON tables, coverage as the partial blocks' bits
SOURCES_TABLE, STIM_TABLE, NRN_TABLE = "tables/sources", "tables/stim_meta", "tables/nrn_meta"
PARTIAL, BIT_OFFSETS, BITS = "coverage/partial", "coverage/bit_offsets", "coverage/bits"
POOL_DTYPES = {PARTIAL: {"int64"}, BIT_OFFSETS: {"int64"}, BITS: {"uint8"},
               SOURCES_TABLE: {"uint8"}, STIM_TABLE: {"uint8"}, NRN_TABLE: {"uint8"}}
# format 1 (read only): a dense (S, N) coverage array and four index maps
COVERAGE_V1 = "coverage"


def write_pool(datasets: Sequence[NeuralDataset], url: str | os.PathLike, *, names: Sequence[str] | None = None,
               storage_options: StorageOptions = None, overwrite: bool = False,
               allowed_roots: Sequence[str] = (), trust: bool = False,
               source_storage_options: StorageOptions = None) -> NeuralDataset:
    """Write the concatenation of store-backed ``datasets`` as a pool at ``url``; return it opened.

    Inputs may be opened sources or opened pools (which flatten to their
    sources). Compatibility is checked exactly as for in-memory concatenation.
    ``storage_options`` reach the pool; the returned pool reads its sources with
    ``source_storage_options``, by default with the options each input was opened with.
    """
    loc = Location.parse(url, storage_options)
    loc.check_writable()
    pooled = concat_datasets(datasets, names)
    parts, part_names = _parts(pooled, names)
    for i, part in enumerate(parts):
        _require_store_backed(part, part_names[i])
    sources = [{
        "name": str(name),
        "ref": make_reference(loc, part.store_url),
        "fingerprint": part.fingerprint,
        "version": getattr(part, "version_path", ""),
        "n_stims": part.get_S(),
        "n_neurons": part.N_neurons,
        "kind": dataset_kind(part),
        "card": getattr(part, "card", None),
        **{k: getattr(part, k) for k in MODALITY_ATTRS if getattr(part, k, None) is not None},
    } for part, name in zip(parts, part_names)]
    with gc_paused():
        tables = {SOURCES_TABLE: json.dumps(sources, separators=(",", ":"), allow_nan=False).encode("utf-8"),
                  STIM_TABLE: encode_columns(list(pooled.stim_meta), "stim_meta"),
                  NRN_TABLE: encode_columns(list(pooled.nrn_meta), "nrn_meta")}
    with gc_paused():  # 10^4 sources' masks and metadata rows
        coverage = _coverage_arrays(pooled.coverage)
    attrs: dict[str, Any] = {
        "format": POOL_FORMAT, "format_version": fmt.POOL_FORMAT_VERSION, "kind": dataset_kind(pooled),
        "class_name": type(pooled).__name__, "dt_ms": float(pooled.dt),
        "n_stims": pooled.get_S(), "n_neurons": pooled.N_neurons, "n_sources": len(parts),
        "duplicate_uids": getattr(pooled, "duplicate_uids", None) or {"stim": [], "neuron": []},
        "digests": {name: _digest(np.frombuffer(data, dtype=np.uint8)) for name, data in tables.items()}
        | {name: _digest(data) for name, data in coverage.items()},
    }
    attrs.update({k: getattr(pooled, k) for k in MODALITY_ATTRS if getattr(pooled, k, None) is not None})
    attrs["fingerprint"] = fingerprint(attrs)
    with staged_write(loc, overwrite=overwrite, kind=POOL_FORMAT, own_top_level=POOL_TOP_LEVEL) as staging:
        group = zarr.create_group(staging.store, attributes=attrs, zarr_format=3)
        for name, data in tables.items():
            _write_array(group, name, np.frombuffer(data, dtype=np.uint8), text=True)
        for name, data in coverage.items():
            _write_array(group, name, data)
        consolidate(staging.store)
    roots = [pool_root(Location.parse(p.store_url)) for p in parts]
    if source_storage_options is None:
        source_storage_options = options_of_parts(parts)
    return open_dataset(loc.url, storage_options=loc.given, allowed_roots=[*allowed_roots, *roots], trust=trust,
                        source_storage_options=source_storage_options)


def options_of_parts(parts: Sequence[NeuralDataset]) -> dict[str, dict] | None:
    """The options each store-backed part was opened with, as a mapping of URL prefixes: one per
    bucket or host (10^4 sources in one bucket make one entry), a part's own URL where parts of
    one bucket were opened with different options."""
    mapping: dict[str, dict] = {}
    for part in parts:
        options = getattr(part, "storage_options", None)
        if not options:
            continue
        key = location_prefix(part.store_url)
        if mapping.get(key, options) != options:
            key = part.store_url
        mapping[key] = options
    return mapping or None


def open_pool(loc: Location, group: zarr.Group, *, allowed_roots: Sequence[str] = (), trust: bool = False,
              accept_changed_sources: bool = False, source_storage_options: StorageOptions = None,
              check_sources: bool | None = None) -> NeuralDataset:
    """Open a pool group from its own tables.

    ``check_sources``: open every source now (concurrently) and check it is there and
    unchanged; default: when the pool has at most ``EAGER_CHECK_MAX_SOURCES`` (64) sources.
    Otherwise each source opens on its first data read, in the process that reads it, and is
    checked then (a pool of 10^4 sources then opens in a constant number of requests).

    ``allowed_roots`` lists extra folders/prefixes references may point into
    (``trust=True`` allows anything); ``accept_changed_sources`` turns a
    changed-source error into a warning (where the source keeps the pooled shape, bin width, kind
    and F / frame size); ``source_storage_options`` (a plain dict
    for every source, or a mapping of URL prefixes) replaces the pool's own options
    for its sources. Format-1 pools open through
    :mod:`deepstrf.store.pool_v1` (read only).
    """
    with gc_paused():
        pooled = _open(loc, group, allowed_roots, trust, accept_changed_sources, source_storage_options)
    if check_sources or (check_sources is None and len(pooled.pool_sources) <= EAGER_CHECK_MAX_SOURCES):
        open_now(pooled)
    return pooled


def checked_sources(loc: Location, group: zarr.Group) -> tuple[dict, list[dict]]:
    """The pool's attributes, checked, and its source entries (references not resolved yet)."""
    attrs = dict(group.attrs)
    fmt.check_format(attrs, loc.url, POOL_FORMAT, supported=fmt.POOL_SUPPORTED_MAJORS)
    v1 = attrs["format_version"].startswith("1.")
    check_pool_attributes(attrs, f"pool {loc.url}", () if v1 else (SOURCES_TABLE, STIM_TABLE, NRN_TABLE, PARTIAL,
                                                                     BIT_OFFSETS, BITS))
    return attrs, read_sources(loc, group, attrs)


def _open(loc: Location, group: zarr.Group, allowed_roots: Sequence[str], trust: bool, accept_changed_sources: bool,
          source_storage_options: StorageOptions) -> NeuralDataset:
    attrs, listed = checked_sources(loc, group)
    v1 = attrs["format_version"].startswith("1.")
    root = pool_root(loc)
    entries = [dict(e, url=resolve_reference(loc, e["ref"], allowed_roots, trust, root)) for e in listed]
    if v1:
        from .pool_v1 import open_pool_v1

        return open_pool_v1(loc, group, attrs, entries, accept_changed_sources, source_storage_options)
    tables = PoolTables(loc, group, attrs, [(e["n_stims"], e["n_neurons"]) for e in entries])
    cls = _CLASSES[attrs["kind"]]
    stim_meta = MetaTable(attrs["n_stims"], tables.stim_columns, "stim_meta")
    nrn_meta = MetaTable(attrs["n_neurons"], tables.nrn_columns, "nrn_meta")
    io = IOCounters()
    openers: dict[str, tuple[dict | None, Callable]] = {}  # by options entry: 10^4 sources share a few
    stim_offsets, neuron_offsets = tables.stim_offsets.tolist(), tables.neuron_offsets.tolist()

    def make_part(k: int) -> NeuralDataset:
        e = entries[k]
        key = options_key(source_storage_options if source_storage_options is not None else loc.given, e["url"])
        if key not in openers:
            options = source_options(loc, source_storage_options, e["url"])
            openers[key] = options, partial(open_dataset, storage_options=options, lazy_metadata=True)
        options, opener = openers[key]
        own = source_attributes(attrs, e)
        handle = SourceHandle(loc.url, e, opener, io, accept_changed_sources, own)
        part = _CLASSES[e["kind"]].__new__(_CLASSES[e["kind"]])
        _fill(part, own, e["url"], LazySourceStims(handle), LazySourceGrid(handle, partial(tables.block, k)),
              MetaSlice(stim_meta, stim_offsets[k], stim_offsets[k + 1]),
              MetaSlice(nrn_meta, neuron_offsets[k], neuron_offsets[k + 1]))
        part.name, part.fingerprint, part.card, part.storage_options = e["name"], e["fingerprint"], e.get("card"), options
        part.version_path = e.get("version", "")
        return part

    parts = PoolParts(len(entries), make_part)
    pooled = cls.__new__(cls)
    _fill(pooled, attrs, loc.url, ConcatSequence(_PartStims(parts), stim_offsets),
          PoolGrid(parts, (stim_offsets, neuron_offsets), tables.coverage, io,
                   None if accept_changed_sources else attrs["fingerprint"]), stim_meta, nrn_meta)
    pooled.fingerprint = attrs["fingerprint"]
    pooled.pool_sources = entries
    pooled.source_names = [e["name"] for e in entries]
    pooled.duplicate_uids = attrs.get("duplicate_uids")
    return pooled


def source_attributes(attrs: dict, entry: dict) -> dict[str, Any]:
    """What the pool says of one pooled source: the pool's bin width, the entry's kind, and the
    entry's F / frame size (a pool written before its entries recorded their own has a single
    kind: the pool's)."""
    return {"dt_ms": attrs["dt_ms"], "kind": entry["kind"], **{k: attrs[k] for k in MODALITY_ATTRS if k in attrs},
            **{k: entry[k] for k in MODALITY_ATTRS if k in entry}}


class PoolParts(Sequence):
    """A format-2 pool's sources as datasets, each made on first access: opening a pool of 10^4
    sources makes none of their objects, a process makes those of the sources it reads."""

    def __init__(self, n: int, make: Callable[[int], NeuralDataset]) -> None:
        self._made: list[NeuralDataset | None] = [None] * n
        self._make: Callable[[int], NeuralDataset] | None = make
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._made)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        part = self._made[k]
        if part is None:
            with self._lock:  # one part per source and process: two would open the source twice
                part = self._made[k]
                if part is None:
                    part = self._made[k] = self._make(k)
        return part

    def made(self) -> list[NeuralDataset]:
        """The parts made so far in this process."""
        return [p for p in self._made if p is not None]

    def __getstate__(self) -> dict:
        return {"_made": list(self), "_make": None}  # every part, made now: the maker stays here

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class _PartStims(Sequence):
    """The stimuli of each part of a pool (``parts[k].stims``), made on access."""

    def __init__(self, parts: Sequence[NeuralDataset]) -> None:
        self.parts = parts

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, k: int):
        return self.parts[k].stims


class PoolGrid(BlockDiagonalGrid):
    """The block-diagonal grid of a format-2 pool: its coverage is the pool's stored one, and
    ``io`` totals the requests and bytes of the sources opened in this process."""

    def __init__(self, sources: PoolParts, offsets: tuple[Sequence[int], Sequence[int]],
                 coverage: Callable[[], Coverage], io: IOCounters, fingerprint: str | None) -> None:
        """``fingerprint``: the pool's, which pins its sources' content (None: the sources may have
        changed since pooling, accept_changed_sources)."""
        super().__init__(sources, offsets)
        self._stored_coverage = coverage
        self.io = io
        self.fingerprint = fingerprint

    def _stored_signature(self) -> str | None:
        return None if self.fingerprint is None else f"pool {self.fingerprint}"

    def opened_readers(self) -> list[Any]:
        """Store readers of the sources opened in this process (none are opened here)."""
        return [r for part in self.sources.made() if part.responses.handle.is_open()
                for r in part.responses.opened_readers()]

    def _coverage(self) -> Coverage:
        return self._stored_coverage()


class PoolTables:
    """The tables of a format-2 pool, each read (and checked against its digest) on first use."""

    def __init__(self, loc: Location, group: zarr.Group, attrs: dict, shapes: Sequence[tuple[int, int]]) -> None:
        self.loc, self.group, self.attrs = loc, group, attrs
        sizes = np.asarray(shapes, dtype=np.int64).reshape(-1, 2)
        self.stim_offsets = np.concatenate([[0], np.cumsum(sizes[:, 0])])
        self.neuron_offsets = np.concatenate([[0], np.cumsum(sizes[:, 1])])
        if (self.stim_offsets[-1], self.neuron_offsets[-1]) != (attrs["n_stims"], attrs["n_neurons"]):
            raise IntegrityError(f"pool {loc.url}: its sources add up to {self.stim_offsets[-1]} stims x "
                                 f"{self.neuron_offsets[-1]} neurons, the pool says {attrs['n_stims']} x "
                                 f"{attrs['n_neurons']}; the pool is damaged: rewrite it with deepstrf concat")
        self._pid = os.getpid()
        self._coverage: Coverage | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "group": None, "_lock": None, "_coverage": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _group(self) -> zarr.Group:
        """The pool's group, for this process: a forked process gets its own storage client
        (a client is bound to its process's event loop), the metadata it already has."""
        if self.group is None:
            self.group, self._pid = open_group(self.loc), os.getpid()
        elif self._pid != os.getpid():
            store = StrictStore(self.loc.zarr_store(read_only=True))
            self.group = zarr.Group(AsyncGroup(metadata=self.group.metadata, store_path=StorePath(store)))
            self._pid = os.getpid()
        return self.group

    def read(self, name: str) -> np.ndarray:
        return read_checked(self.loc, self._group(), name, self.attrs["digests"][name])

    def stim_columns(self):
        return self._columns(STIM_TABLE, self.attrs["n_stims"])

    def nrn_columns(self):
        return self._columns(NRN_TABLE, self.attrs["n_neurons"])

    def _columns(self, name: str, n: int):
        with gc_paused():
            found, columns = decode_columns(self.read(name).tobytes())
        if found != n:
            raise IntegrityError(f"pool {self.loc.url}: {name} has {found} rows, expected {n}; rewrite the pool")
        return columns

    def coverage(self) -> Coverage:
        with self._lock:
            if self._coverage is None:
                self._coverage = _coverage_from_arrays(
                    self.loc, self.stim_offsets, self.neuron_offsets, *(self.read(n) for n in (PARTIAL, BIT_OFFSETS, BITS)))
            return self._coverage

    def block(self, k: int) -> Coverage:
        """Source ``k``'s own coverage (its block of the pool's)."""
        return Coverage.dense(self.coverage().block_mask(k))


def read_sources(loc: Location, group: zarr.Group, attrs: dict) -> list[dict]:
    """The pool's source entries (name, ref, fingerprint, n_stims, n_neurons, kind, card)."""
    if "sources" in attrs:  # format 1 keeps them in the attributes
        entries = attrs["sources"]
    else:
        raw = read_checked(loc, group, SOURCES_TABLE, attrs["digests"][SOURCES_TABLE])
        try:
            entries = json.loads(raw.tobytes().decode("utf-8"))
        except ValueError as e:
            raise IntegrityError(f"pool {loc.url}: {SOURCES_TABLE} is not valid JSON ({e}); rewrite the pool") from e
    check_pool_entries(entries, f"pool {loc.url}")
    return entries


def read_checked(loc: Location, group: zarr.Group, name: str, digest: str) -> np.ndarray:
    """A whole pool array, refused if it does not match the digest its fingerprinted attributes record."""
    nodes = group.metadata.consolidated_metadata.flattened_metadata if group.metadata.consolidated_metadata else {}
    meta = as_written(nodes[name]) if name in nodes else None
    if meta is not None:
        check_array(name, meta, (None,) * len(meta["shape"]), POOL_DTYPES.get(name), f"pool {loc.url}")
    try:
        data = np.asarray(group[name][...]) if meta is None else read_array(group.store_path.store, name, meta, group)
    except MissingChunk as e:
        raise IntegrityError(f"pool {loc.url}: a chunk of array {name!r} is missing ({e}); the pool is damaged: "
                             "rewrite it with deepstrf concat") from e
    except KeyError as e:
        raise IntegrityError(f"pool {loc.url}: array {name!r} is missing; the pool is damaged: rewrite it "
                             "with deepstrf concat") from e
    except ValueError as e:
        raise IntegrityError(f"pool {loc.url}: array {name!r} is corrupt or truncated ({type(e).__name__}: {e}); "
                             "the pool is damaged: rewrite it with deepstrf concat") from e
    if _digest(data) != digest:
        raise IntegrityError(f"pool {loc.url}: array {name!r} does not match its recorded digest; the pool is "
                             "damaged or was edited: rewrite it with deepstrf concat")
    return data


def read_array(store: Any, name: str, meta: dict, group: zarr.Group) -> np.ndarray:
    """A whole pool array: read here when in deepstrf's layout (which sizes nothing by what its
    document declares before the store is seen to hold it), else by zarr."""
    small = SmallArray.of(store, name, meta)
    if small is None:
        return np.asarray(group[name][...])
    return small.read_here() if getattr(store, "reads_here", False) else sync(small.read())


def _digest(data: np.ndarray) -> str:
    hasher = content_hasher()
    update(hasher, data)
    return array_digest(hasher)


def _fill(ds: NeuralDataset, attrs: dict, url: str, stims: Any, responses: Any, stim_meta: Any, nrn_meta: Any) -> None:
    NeuralDataset.__init__(ds, path=url, dt_ms=attrs["dt_ms"])
    if attrs["kind"] == "audio":
        ds.F, ds.audio_fs, ds.hearing_range_hz = attrs["F"], attrs.get("audio_fs"), None
    elif attrs["kind"] == "video":
        ds.H, ds.W = attrs["H"], attrs["W"]
    ds.stims, ds.responses, ds.stim_meta, ds.nrn_meta = stims, responses, stim_meta, nrn_meta
    ds.N_neurons = responses.n_neurons
    ds.store_url = url


def _coverage_arrays(coverage: Coverage) -> dict[str, np.ndarray]:
    """Format 2 coverage: the partial blocks' indices, and their masks' bits concatenated."""
    partial_blocks = [k for k, m in enumerate(coverage.masks) if m is not None]
    sizes = [coverage.masks[k].size for k in partial_blocks]
    flat = np.concatenate([coverage.masks[k].reshape(-1) for k in partial_blocks]) if partial_blocks \
        else np.zeros(0, dtype=bool)
    return {PARTIAL: np.asarray(partial_blocks, dtype=np.int64),
            BIT_OFFSETS: np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64),
            BITS: np.packbits(flat)}


def _coverage_from_arrays(loc: Location, stim_offsets: np.ndarray, neuron_offsets: np.ndarray,
                          partial_blocks: np.ndarray, bit_offsets: np.ndarray, bits: np.ndarray) -> Coverage:
    K = len(stim_offsets) - 1
    heights, widths = np.diff(stim_offsets), np.diff(neuron_offsets)
    ok = (len(bit_offsets) == len(partial_blocks) + 1 and (partial_blocks >= 0).all() and (partial_blocks < K).all()
          and np.array_equal(np.diff(bit_offsets), heights[partial_blocks] * widths[partial_blocks])
          and len(bits) == -(-int(bit_offsets[-1]) // 8))
    if not ok:
        raise IntegrityError(f"pool {loc.url}: its coverage arrays do not match its sources' shapes; "
                             "rewrite the pool with deepstrf concat")
    flat = np.unpackbits(bits, count=int(bit_offsets[-1])).astype(bool)
    masks: list[np.ndarray | None] = [None] * K
    for i, k in enumerate(partial_blocks.tolist()):
        masks[k] = flat[bit_offsets[i]:bit_offsets[i + 1]].reshape(int(heights[k]), int(widths[k]))
    return Coverage(stim_offsets, neuron_offsets, masks)


def pool_card(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per source entry: name, reference, shape and the attribution fields of its dataset card."""
    out = []
    for e in entries:
        card = e.get("card") or {}
        out.append({"name": e["name"], "ref": e["ref"], "stims": e["n_stims"], "neurons": e["n_neurons"],
                    **{k: card.get(k) for k in ("license", "citation", "description") if card.get(k)}})
    return out


def _parts(pooled: NeuralDataset, names: Sequence[str] | None) -> tuple[list[NeuralDataset], list[str]]:
    if isinstance(pooled.responses, BlockDiagonalGrid) and hasattr(pooled, "source_names"):
        return list(pooled.responses.sources), list(pooled.source_names)
    label = names[0] if names else default_name(pooled)
    return [pooled], [label]


def _require_store_backed(ds: NeuralDataset, name: str) -> None:
    if not getattr(ds, "store_url", None) or not getattr(ds, "fingerprint", None):
        raise ValueError(
            f"cannot pool source {name!r}: it is an in-memory dataset, and a pool only references stores. "
            "Save it first with deepstrf.save_dataset(ds, url), open it with deepstrf.open_dataset(url), "
            "and pool the opened dataset.")
    edited = isinstance(ds.responses, ResponseGrid) and (ds.responses._transforms or ds.responses._overrides)
    edited = edited or isinstance(ds.stims, MappedSequence) or (
        isinstance(ds.stims, LazySequence) and ds.stims._overrides)
    if edited:
        raise ValueError(
            f"cannot pool source {name!r} ({ds.store_url}): it has transforms or edits applied in memory "
            "(smooth/normalize/standardize or assigned cells) that a pool of references cannot carry. "
            "Pool the unmodified opened sources and apply the transforms to the opened pool.")


def _write_array(group: zarr.Group, name: str, data: np.ndarray, text: bool = False) -> None:
    """One whole-array chunk (up to ``fmt.POOL_CHUNK_BYTES``): a table is one request to read."""
    chunk = max(1, min(len(data), fmt.POOL_CHUNK_BYTES // data.dtype.itemsize))
    arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=(chunk,),
                             **fmt.codecs(data.dtype, text=text))
    arr[...] = data


def source_options(loc: Location, source_storage_options: StorageOptions, url: str) -> dict | None:
    """Options for the source at ``url`` of the pool at ``loc``: from ``source_storage_options``
    when given (a plain dict: every source), else from the pool's own (:func:`options_from`)."""
    if source_storage_options is not None:
        return options_for(source_storage_options, url)
    return options_from(loc.url, loc.given, url)


def _open_root(loc: Location, root: dict, **kw: Any) -> NeuralDataset:
    return open_pool(loc, group_of(loc, root), **kw)


OPENERS[POOL_FORMAT] = _open_root
