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
