"""Evaluation metrics: response reliability and per-neuron prediction scores."""

from .correlation import NeuronScores, corrcoef_rows, describe, pearson_from_moments, spearman_brown_ceiling
from .quality import pearson, signal_noise_power, split_half_ceiling

__all__ = ["NeuronScores", "corrcoef_rows", "describe", "pearson", "pearson_from_moments", "signal_noise_power",
           "spearman_brown_ceiling", "split_half_ceiling"]
