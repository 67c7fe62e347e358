"""deepSTRF-compatible helpers (``deepstrf.utils.data``)."""

from .data import concat_neural_datasets, hanning_smooth, neural_collate

__all__ = ["concat_neural_datasets", "hanning_smooth", "neural_collate"]
