"""deepSTRF-compatible facade: ``from deepstrf.utils.data import ...``.

The functions live in the layers that own them; this module gathers them at
the path deepSTRF users import from, and adds the store-aware form of
``concat_neural_datasets``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..datasets.collate import CompactBatch, compact_collate, fill_missing_data, neural_collate
from ..datasets.concat import DuplicateUIDWarning, concat_datasets
from ..datasets.neural_dataset import NeuralDataset
from ..datasets.sampling import SourceBatchSampler
from ..datasets.smoothing import ResponseSmoothingTransform, hanning_smooth

__all__ = [
    "CompactBatch", "DuplicateUIDWarning", "ResponseSmoothingTransform", "SourceBatchSampler",
    "compact_collate", "concat_neural_datasets", "concatenate_datasets", "fill_missing_data",
    "hanning_smooth", "neural_collate",
]


def concat_neural_datasets(datasets: Sequence[NeuralDataset], names: Sequence[str] | None = None, *,
                           store: str | None = None, storage_options: dict[str, Any] | None = None,
                           overwrite: bool = False, **pool_options: Any) -> NeuralDataset:
    """Concatenate datasets along both the stim and the neuron axis.

    The result has S = sum S_i stims and N = sum N_i neurons, block-diagonal,
    every cross-block pair the ``(1, 1)`` NaN sentinel. ``names`` label the
    sources (key ``"dataset"`` in the result's metadata). In memory the
    result is a lazy view (O(S + N)); with ``store=URL`` the inputs must be
    store-backed and a pool group of references is written there and opened.
    """
    if store is None:
        if pool_options or overwrite or storage_options is not None:
            raise TypeError("storage_options/overwrite/pool options only apply with store=URL")
        return concat_datasets(datasets, names)
    from ..store.pool import write_pool

    return write_pool(datasets, store, names=names, storage_options=storage_options,
                      overwrite=overwrite, **pool_options)


def concatenate_datasets(ds1: NeuralDataset, ds2: NeuralDataset) -> NeuralDataset:
    """deepSTRF's older name for two inputs, deprecated there in its docstring only (no warning,
    so none here either); use ``concat_neural_datasets([ds1, ds2])``."""
    return concat_neural_datasets([ds1, ds2])
