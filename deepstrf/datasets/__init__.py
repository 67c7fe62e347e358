"""In-memory data model: datasets, lazy views, concatenation, batching."""

from .neural_dataset import NeuralDataset

__all__ = ["NeuralDataset"]
