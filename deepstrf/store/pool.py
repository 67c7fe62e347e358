"""Pool stores: a concatenation written as references plus a coverage mask.

A pool group copies no stimulus or response data. It records, per source,
a reference (relative when under the pool's root), the source's fingerprint
and shape and its dataset card, plus the ``(S, N)`` coverage mask and the
stim/neuron index maps. Opening a pool opens each source (checking trust and
fingerprints) and concatenates them lazily in memory, which gives exactly the
dataset ``concat_neural_datasets`` gives on the opened sources.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import zarr

from ..datasets.concat import concat_datasets
from ..datasets.neural_dataset import NeuralDataset
from ..datasets.views import BlockDiagonalGrid, LazySequence, MappedSequence, ResponseGrid
from ..errors import IntegrityError, SourceChangedError, StoreNotFoundError
from ..forksafe import thread_map
from . import format as fmt
from .atomic import consolidate, staged_write
from .dataset import OPENERS, open_dataset
from .integrity import fingerprint
from .location import Location
from .references import make_reference, pool_root, resolve_reference
from .writer import dataset_kind

POOL_FORMAT = "deepstrf.pool"
COVERAGE = "coverage"
INDEX_ARRAYS = ("index/stim_source", "index/stim_local", "index/neuron_source", "index/neuron_local")
POOL_TOP_LEVEL = ("coverage", "index")
MODALITY_ATTRS = ("F", "audio_fs", "H", "W")


class SourceChangedWarning(UserWarning):
    """A pooled source changed after pooling and the caller accepted it."""


def write_pool(datasets: Sequence[NeuralDataset], url: str | os.PathLike, *, names: Sequence[str] | None = None,
               storage_options: dict | None = None, overwrite: bool = False,
               allowed_roots: Sequence[str] = (), trust: bool = False) -> NeuralDataset:
    """Write the concatenation of store-backed ``datasets`` as a pool at ``url``; return it opened.

    Inputs may be opened sources or opened pools (which flatten to their
    sources). Compatibility is checked exactly as for in-memory concatenation.
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
        "n_stims": part.get_S(),
        "n_neurons": part.N_neurons,
        "kind": dataset_kind(part),
        "card": getattr(part, "card", None),
    } for part, name in zip(parts, part_names)]
    attrs: dict[str, Any] = {
        "format": POOL_FORMAT, "format_version": fmt.POOL_FORMAT_VERSION, "kind": dataset_kind(pooled),
        "class_name": type(pooled).__name__, "dt_ms": float(pooled.dt),
        "n_stims": pooled.get_S(), "n_neurons": pooled.N_neurons, "sources": sources,
    }
    attrs.update({k: getattr(pooled, k) for k in MODALITY_ATTRS if getattr(pooled, k, None) is not None})
    attrs["fingerprint"] = fingerprint(attrs)
    coverage = pooled.nrn_masks.numpy()
    with staged_write(loc, overwrite=overwrite, own_top_level=POOL_TOP_LEVEL) as staging:
        group = zarr.create_group(staging.store, attributes=attrs, zarr_format=3)
        _write_array(group, COVERAGE, coverage, chunks=_coverage_chunks(coverage.shape))
        for name, data in zip(INDEX_ARRAYS, _index_maps(parts)):
            _write_array(group, name, data, chunks=(fmt.chunk_elems(data.dtype),))
        consolidate(staging.store)
    roots = [pool_root(Location.parse(p.store_url)) for p in parts]
    return open_dataset(loc.url, storage_options=loc.storage_options,
                        allowed_roots=[*allowed_roots, *roots], trust=trust)


def open_pool(loc: Location, group: zarr.Group, *, allowed_roots: Sequence[str] = (), trust: bool = False,
              accept_changed_sources: bool = False, source_storage_options: dict | None = None) -> NeuralDataset:
    """Open a pool group: each source opened lazily, trust and fingerprint checked, then concatenated.

    ``allowed_roots`` lists extra folders/prefixes references may point into
    (``trust=True`` allows anything); ``accept_changed_sources`` turns a
    changed-source error into a warning; ``source_storage_options`` replaces
    the pool's own options for every source.
    """
    attrs = dict(group.attrs)
    fmt.check_format(attrs, loc.url, POOL_FORMAT)
    entries = [dict(e, url=resolve_reference(loc, e["ref"], allowed_roots, trust)) for e in attrs["sources"]]

    def open_source(entry: dict) -> NeuralDataset:
        options = (source_storage_options if source_storage_options is not None
                   else _same_protocol_options(loc, entry["url"]))
        try:
            return open_dataset(entry["url"], storage_options=options)
        except StoreNotFoundError as e:
            raise StoreNotFoundError(
                f"pool {loc.url}: source {entry['name']!r} is missing at {entry['url']} (reference "
                f"{entry['ref']!r}); restore it there or rewrite the pool. ({e})") from e

    # sources are opened concurrently: over a remote store each open is a few round trips
    opened = thread_map(open_source, entries, max_workers=16, name="deepstrf-open")
    unchanged = all([_check_fingerprint(loc, e, src, accept_changed_sources) for e, src in zip(entries, opened)])
    names = [e["name"] for e in entries]
    pooled = concat_datasets(opened, names) if len(opened) > 1 else _single(opened[0], names[0])
    pooled.path = loc.url
    pooled.store_url = loc.url
    pooled.fingerprint = attrs["fingerprint"]
    pooled.pool_sources = entries
    if unchanged:  # the stored mask is exact; a changed source's mask comes from the source itself
        pooled._nrn_masks_cache = _read_coverage(loc, group, pooled)
    return pooled


def pool_card(attrs: dict[str, Any]) -> list[dict[str, Any]]:
    """Per source: name, reference, shape and the attribution fields of its dataset card."""
    out = []
    for e in attrs["sources"]:
        card = e.get("card") or {}
        out.append({"name": e["name"], "ref": e["ref"], "stims": e["n_stims"], "neurons": e["n_neurons"],
                    **{k: card.get(k) for k in ("license", "citation", "description") if card.get(k)}})
    return out


def _parts(pooled: NeuralDataset, names: Sequence[str] | None) -> tuple[list[NeuralDataset], list[str]]:
    if isinstance(pooled.responses, BlockDiagonalGrid) and hasattr(pooled, "source_names"):
        return list(pooled.responses.sources), list(pooled.source_names)
    label = names[0] if names else getattr(pooled, "name", None) or type(pooled).__name__
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


def _index_maps(parts: Sequence[NeuralDataset]) -> list[np.ndarray]:
    src_dtype = fmt.smallest_int(0, max(len(parts) - 1, 0))
    stim_source = np.concatenate([np.full(p.get_S(), k) for k, p in enumerate(parts)]).astype(src_dtype)
    stim_local = np.concatenate([np.arange(p.get_S()) for p in parts]).astype(np.int64)
    nrn_source = np.concatenate([np.full(p.N_neurons, k) for k, p in enumerate(parts)]).astype(src_dtype)
    nrn_local = np.concatenate([np.arange(p.N_neurons) for p in parts]).astype(np.int64)
    return [stim_source, stim_local, nrn_source, nrn_local]


def _coverage_chunks(shape: tuple[int, int]) -> tuple[int, int]:
    cols = min(shape[1], 4096)
    return (max(1, min(shape[0], fmt.INDEX_CHUNK_BYTES // max(cols, 1))), cols)


def _write_array(group: zarr.Group, name: str, data: np.ndarray, chunks: tuple[int, ...]) -> None:
    arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks, **fmt.codecs(data.dtype))
    arr[...] = data


def _same_protocol_options(loc: Location, url: str) -> dict | None:
    """The caller's storage options apply to sources reached over the pool's own protocol."""
    return loc.storage_options if Location.parse(url).protocol == loc.protocol else None


def _check_fingerprint(loc: Location, entry: dict, src: NeuralDataset, accept: bool) -> bool:
    """True if the source is as pooled; warn (``accept``) or raise if it changed."""
    if src.fingerprint == entry["fingerprint"]:
        return True
    msg = (f"pool {loc.url}: source {entry['name']!r} at {entry['url']} changed after pooling "
           f"(fingerprint {src.fingerprint}, pooled {entry['fingerprint']})")
    if not accept:
        raise SourceChangedError(
            f"{msg}. Rewrite the pool with deepstrf concat, or open it with accept_changed_sources=True "
            "if the change is intended.")
    if (src.get_S(), src.N_neurons) != (entry["n_stims"], entry["n_neurons"]):
        raise SourceChangedError(f"{msg}, and its shape changed too, so the pool cannot be used. Rewrite it.")
    warnings.warn(msg, SourceChangedWarning, stacklevel=3)
    return False


def _single(ds: NeuralDataset, name: str) -> NeuralDataset:
    ds.stim_meta = [{**m, "dataset": name} for m in ds.stim_meta]
    ds.nrn_meta = [{**m, "dataset": name} for m in ds.nrn_meta]
    return ds


def _read_coverage(loc: Location, group: zarr.Group, pooled: NeuralDataset) -> torch.Tensor:
    coverage = torch.from_numpy(np.asarray(group[COVERAGE][...], dtype=bool))
    if tuple(coverage.shape) != (pooled.get_S(), pooled.N_neurons):
        raise IntegrityError(f"pool {loc.url}: coverage has shape {tuple(coverage.shape)}, "
                                 f"expected {(pooled.get_S(), pooled.N_neurons)}")
    return coverage


OPENERS[POOL_FORMAT] = open_pool
