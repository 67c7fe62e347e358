"""Temporal smoothing of spike-count responses."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError


def hanning_bins(window_ms: float, dt_ms: float) -> int:
    """Width in bins of a ``window_ms`` Hanning window: ``window_ms // dt_ms``, made odd (at least 1).
    A non-positive (or NaN) width raises :class:`InvalidArgumentError`, an ``AssertionError`` as in
    deepSTRF."""
    if not (window_ms > 0 and dt_ms > 0):
        raise InvalidArgumentError(
            f"hanning smoothing: window_ms and dt_ms must be positive (got window_ms={window_ms}, dt_ms={dt_ms}); "
            "window_ms is the window's full width in ms")
    K = max(int(window_ms // dt_ms), 1)
    return K + 1 if K % 2 == 0 else K


def hanning_smooth(response: torch.Tensor, window_ms: float, dt_ms: float) -> torch.Tensor:
    """Convolve ``response`` along its last axis with a Hanning window of :func:`hanning_bins` bins.

    The window is not normalised and the signal is zero-padded at both ends, as in
    deepSTRF (Hsu, Borst & Theunissen 2004 PSTH smoothing). An integer ``response`` is
    smoothed as float32 (deepSTRF casts the window to the integer dtype, which leaves it
    unsmoothed); a NaN spreads to the bins the window's non-zero taps reach (in deepSTRF,
    to the whole window).
    """
    K = hanning_bins(window_ms, dt_ms)
    dtype = response.dtype if response.is_floating_point() else torch.float32
    pad = (K - 1) // 2
    x = F.pad(response.to(dtype), (pad, pad))
    T = response.shape[-1]
    # one multiply-add per tap instead of conv1d: no BLAS call, which DataLoader workers forked from
    # a trainer running torch BLAS in other threads must avoid (docs/streaming.md)
    out = torch.zeros(response.shape, dtype=dtype, device=response.device)
    for j, w in enumerate(np.hanning(K).tolist()):
        if w:
            out.add_(x[..., j:j + T], alpha=w)
    return out


class ResponseSmoothingTransform(torch.nn.Module):
    """:func:`hanning_smooth` as a module, for a transform pipeline: smooths ``(..., T)`` responses
    (a batch ``(B, N, R, T)`` or one item's ``(N, R, T)``) with a ``window_size_ms`` window of
    ``dt_ms`` bins."""

    def __init__(self, dt_ms: float = 1, window_size_ms: float = 21, *args, **kwargs) -> None:
        super().__init__()
        self.dt_ms, self.window_size_ms = dt_ms, window_size_ms

    def forward(self, responses: torch.Tensor, dt: float | None = None) -> torch.Tensor:
        return hanning_smooth(responses, window_ms=self.window_size_ms, dt_ms=self.dt_ms if dt is None else dt)
