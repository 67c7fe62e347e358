"""Base class of encoding models, compatible with deepSTRF's ``NeuralModel``.

A model maps a batch of stimuli to predicted responses. deepSTRF's template
pipeline is kept: ``wav2spec -> prefiltering -> core -> readout``, the first
three defaulting to ``nn.Identity``; a subclass must at least set a
``readout`` (or override :meth:`forward`).
"""

from __future__ import annotations

import torch
from torch import nn


class ModelValidationError(AssertionError, ValueError):
    """A model's attributes break the deepSTRF model contract (raised by ``validate``).

    An ``AssertionError`` like deepSTRF's, and a ``ValueError``; raised
    explicitly so it survives ``python -O``.
    """


class NeuralModel(nn.Module):
    """Encoding model of sensory neural responses.

    ``out_neurons`` is the number of output neurons, kept as ``self.O``.
    ``forward(stimulus)`` runs ``wav2spec -> prefiltering -> core -> readout``
    and returns predictions ``(B, N, 1, T)``; without a ``readout`` it raises
    ``NotImplementedError``.
    """

    def __init__(self, out_neurons: int = 1, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.O = out_neurons
        self.wav2spec: nn.Module = nn.Identity()
        self.prefiltering: nn.Module = nn.Identity()
        self.core: nn.Module = nn.Identity()

    def _readout(self) -> nn.Module:
        readout = self._modules.get("readout", getattr(self, "__dict__", {}).get("readout"))
        if readout is None:
            raise NotImplementedError(
                f"{type(self).__name__} has no readout: set self.readout to an nn.Module "
                "in __init__ or override forward()")
        return readout

    def forward(self, stimulus: torch.Tensor) -> torch.Tensor:
        """Apply ``wav2spec``, ``prefiltering``, ``core`` and ``readout`` in turn."""
        readout = self._readout()
        x = self.wav2spec(stimulus)
        x = self.prefiltering(x)
        return readout(self.core(x))

    def detach(self) -> None:
        """Cut stateful variables from the graph (no-op; recurrent models override it)."""

    def count_trainable_params(self) -> int:
        """Number of parameters with ``requires_grad=True``."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def validate(self) -> None:
        """Check ``O`` is a positive int and the pipeline slots are modules."""
        if not (isinstance(self.O, int) and not isinstance(self.O, bool) and self.O > 0):
            raise ModelValidationError(f"self.O must be a positive int (got {self.O!r})")
        readout = self._modules.get("readout")
        if not isinstance(readout, nn.Module):
            raise ModelValidationError(
                f"{type(self).__name__}.readout must be set to an nn.Module before validate()")
        for slot in ("wav2spec", "prefiltering", "core"):
            if not isinstance(getattr(self, slot, None), nn.Module):
                raise ModelValidationError(
                    f"self.{slot} must be an nn.Module (got {type(getattr(self, slot, None)).__name__})")
