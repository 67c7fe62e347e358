"""Streaming layer: shard, shuffle and read a store (or any dataset) into PyTorch training.

``partition`` and ``shuffle`` are pure functions of (seed, epoch, rank, world
size, worker); ``reader`` builds items and batches from batched raw reads;
``prefetch``, ``cache`` and ``retry`` make reading bounded and robust;
``dataset`` composes them into :class:`StreamingNeuralDataset`, and ``loader`` runs its
passes with DataLoader worker processes (:class:`StreamingDataLoader`).
"""

from .dataset import StreamingNeuralDataset
from .loader import StreamingDataLoader
from .retry import RetryPolicy, StreamReadError

__all__ = ["RetryPolicy", "StreamReadError", "StreamingDataLoader", "StreamingNeuralDataset"]
