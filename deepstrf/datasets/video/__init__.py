from .video_dataset import VideoNeuralDataset

__all__ = ["VideoNeuralDataset"]
