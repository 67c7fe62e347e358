"""Zarr v3 stores: ``save_dataset`` writes a source store, ``open_dataset`` opens one lazily.

Format v1 is described in ``docs/format.md``.
"""

from .dataset import ZarrResponseGrid, ZarrStims, open_dataset, storage_io
from .location import Location, canonical_url
from .pool import open_pool, write_pool
from .repin import update_pool
from .versions import Version, list_versions, prune_versions
from .writer import save_dataset

__all__ = ["Location", "Version", "ZarrResponseGrid", "ZarrStims", "canonical_url", "list_versions", "open_dataset",
           "open_pool", "prune_versions", "save_dataset", "storage_io", "update_pool", "write_pool"]
