"""Temporal smoothing of spike-count responses."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def hanning_smooth(response: torch.Tensor, window_ms: float, dt_ms: float) -> torch.Tensor:
    """Convolve ``response`` along its last axis with a Hanning window.

    The window spans ``window_ms // dt_ms`` bins, made odd (at least 1); it is
    not normalised and the signal is zero-padded at both ends, as in
    deepSTRF (Hsu, Borst & Theunissen 2004 PSTH smoothing).
    """
    if not (window_ms > 0 and dt_ms > 0):
        raise ValueError(f"window_ms and dt_ms must be positive (got {window_ms}, {dt_ms})")
    K = max(int(window_ms // dt_ms), 1)
    if K % 2 == 0:
        K += 1
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
