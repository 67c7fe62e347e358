from .audio_dataset import AudioNeuralDataset

__all__ = ["AudioNeuralDataset"]
