"""deepstrf: pool neural recordings from many labs into one dataset.

Public entry points: :func:`concat_neural_datasets`, :func:`save_dataset`,
:func:`open_dataset` and :class:`StreamingNeuralDataset`.
"""

from .utils.data import concat_neural_datasets

__version__ = "0.1.0"


def __getattr__(name: str):
    # The store and streaming layers pull in zarr/fsspec; import them on first use.
    if name in ("save_dataset", "open_dataset"):
        from . import store

        return getattr(store, name)
    if name == "StreamingNeuralDataset":
        from .stream import StreamingNeuralDataset

        return StreamingNeuralDataset
    raise AttributeError(f"module 'deepstrf' has no attribute {name!r}")


__all__ = ["StreamingNeuralDataset", "concat_neural_datasets", "open_dataset", "save_dataset"]
