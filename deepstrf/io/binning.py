"""Spike times -> counts per presentation bin, and which unit was recorded during which presentation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bin_edges(starts: np.ndarray, n_bins: np.ndarray, dt_s: float) -> np.ndarray:
    """Concatenated bin edges of every presentation: ``starts[p] + k * dt_s`` for ``k = 0..n_bins[p]``."""
    k = np.concatenate([np.arange(n + 1) for n in n_bins.tolist()]) if len(n_bins) else np.zeros(0)
    return np.repeat(starts, n_bins + 1) + k * dt_s


def count_spikes(spikes: np.ndarray, edges: np.ndarray, n_bins: np.ndarray) -> np.ndarray:
    """Counts in the half-open bins ``[edge_k, edge_k+1)`` of every presentation, concatenated
    (``sum(n_bins)`` values, presentation after presentation). ``spikes`` must be sorted."""
    pos = np.searchsorted(spikes, edges, side="left")
    steps = np.diff(pos)
    # drop the step from one presentation's last edge to the next one's first edge
    boundaries = np.cumsum(n_bins + 1)[:-1] - 1
    return np.delete(steps, boundaries)


def recorded(windows: np.ndarray, intervals: Sequence[np.ndarray] | None) -> np.ndarray:
    """``(P,)`` bool: presentation window ``[a, b)`` lies inside one of the ``(k, 2)`` intervals
    (``None``: recorded throughout)."""
    if intervals is None:
        return np.ones(len(windows), dtype=bool)
    iv = np.asarray(intervals, dtype=np.float64).reshape(-1, 2)
    if not len(iv):
        return np.zeros(len(windows), dtype=bool)
    inside = (iv[None, :, 0] <= windows[:, None, 0]) & (windows[:, None, 1] <= iv[None, :, 1])
    return inside.any(axis=1)


def bin_average(frames: np.ndarray, boundaries: np.ndarray, edges: np.ndarray, fill: float) -> np.ndarray:
    """Time-weighted mean of piecewise-constant ``frames`` over each bin ``[edges[t], edges[t+1])``.

    Frame ``i`` holds from ``boundaries[i]`` to ``boundaries[i+1]``; the part of a bin outside all
    frames counts as ``fill``. Exact for any ratio of frame to bin duration (up- or down-sampling).
    """
    x = np.asarray(frames, dtype=np.float64)
    widths = np.diff(boundaries)
    cum = np.concatenate([np.zeros((1,) + x.shape[1:]), np.cumsum(x * widths.reshape(-1, *[1] * (x.ndim - 1)), 0)])
    e = np.clip(edges, boundaries[0], boundaries[-1])
    i = np.clip(np.searchsorted(boundaries, e, side="right") - 1, 0, len(widths) - 1)
    frac = ((e - boundaries[i]) / widths[i]).reshape(-1, *[1] * (x.ndim - 1))
    at_edges = cum[i] + frac * (cum[i + 1] - cum[i])
    bin_len = np.diff(edges).reshape(-1, *[1] * (x.ndim - 1))
    covered = np.diff(e).reshape(bin_len.shape)
    return (np.diff(at_edges, axis=0) + fill * (bin_len - covered)) / bin_len
