"""Reading format-1 pools (deepstrf 0.1 wrote them; nothing writes them any more).

A format-1 pool lists its sources in its attributes and stores coverage as a
dense ``(S, N)`` array. Opening one opens every source at once, as it always
did. ``deepstrf concat NEW OLD`` rewrites it as a format-2 pool.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import zarr

from ..datasets.concat import concat_datasets
from ..datasets.coverage import Coverage
from ..datasets.neural_dataset import NeuralDataset
from ..errors import IntegrityError
from ..forksafe import thread_map
from .dataset import open_dataset
from .lazy import check_fingerprint, open_pinned
from .location import Location
from .options import StorageOptions

COVERAGE = "coverage"


def open_pool_v1(loc: Location, group: zarr.Group, attrs: dict, entries: list[dict], accept_changed: bool,
                 source_storage_options: StorageOptions) -> NeuralDataset:
    """Every source opened and checked now, concatenated; coverage from the stored dense mask."""
    from .pool import source_attributes, source_options

    def open_source(entry: dict) -> NeuralDataset:
        options = source_options(loc, source_storage_options, entry["url"])
        return open_pinned(partial(open_dataset, storage_options=options), loc.url, entry, accept_changed)

    opened = thread_map(open_source, entries, max_workers=16, name="deepstrf-open")
    unchanged = all([check_fingerprint(loc.url, e, src, accept_changed, source_attributes(attrs, e))
                     for e, src in zip(entries, opened)])
    names = [e["name"] for e in entries]
    if len(opened) > 1:
        pooled = concat_datasets(opened, names)
    else:
        pooled = opened[0]
        pooled.stim_meta = [{**m, "dataset": names[0]} for m in pooled.stim_meta]
        pooled.nrn_meta = [{**m, "dataset": names[0]} for m in pooled.nrn_meta]
    pooled.path = pooled.store_url = loc.url
    pooled.fingerprint = attrs["fingerprint"]
    pooled.pool_sources = entries
    if unchanged:  # the stored mask is exact; a changed source's mask comes from the source itself
        stored = np.asarray(group[COVERAGE][...], dtype=bool)
        if stored.shape != (pooled.get_S(), pooled.N_neurons):
            raise IntegrityError(f"pool {loc.url}: coverage has shape {stored.shape}, "
                                 f"expected {(pooled.get_S(), pooled.N_neurons)}")
        pooled._coverage_cache = Coverage.block_diagonal(
            [Coverage.dense(stored[s.start:s.stop, n.start:n.stop]) for _, s, n in pooled.source_blocks()])
    return pooled
