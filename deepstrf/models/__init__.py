"""Encoding models: deepSTRF's ``NeuralModel`` base and a pooled model with
per-neuron heads, plus masked Poisson losses."""

from .losses import masked_poisson_loss, poisson_loss_compact, poisson_loss_dense
from .neural_model import ModelValidationError, NeuralModel
from .pooled import CausalConv2d, CausalConvBackbone, NeuronReadout, PooledEncodingModel

__all__ = ["CausalConv2d", "CausalConvBackbone", "ModelValidationError", "NeuralModel", "NeuronReadout",
           "PooledEncodingModel", "masked_poisson_loss", "poisson_loss_compact", "poisson_loss_dense"]
