"""Spike times -> counts per presentation bin, and which unit was recorded during which presentation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class BinPlan:
    """The bins of every presentation, prepared once to count the spikes of many units.

    Presentation ``p`` has bins ``[starts[p] + k * dt_s, starts[p] + (k + 1) * dt_s)`` for
    ``k < n_bins[p]``; :meth:`count` returns their counts concatenated, presentation after
    presentation. Each spike finds its presentation by a binary search over the (few thousand)
    window starts and its bin by arithmetic, so a unit costs O(spikes), not O(bins). Overlapping
    windows (long pre/post windows) are split into layers of disjoint windows: a spike then
    counts in each window that holds it.
    """

    def __init__(self, starts: np.ndarray, n_bins: np.ndarray, dt_s: float) -> None:
        self.dt_s = dt_s
        self.n_values = int(n_bins.sum())
        offsets = np.concatenate([[0], np.cumsum(n_bins)[:-1]]).astype(np.int64)
        self.layers: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        ends: list[float] = []
        members: list[list[int]] = []
        for p in np.argsort(starts, kind="stable").tolist():
            layer = next((i for i, end in enumerate(ends) if end <= starts[p]), len(ends))
            if layer == len(ends):
                ends.append(0.0)
                members.append([])
            ends[layer] = starts[p] + n_bins[p] * dt_s
            members[layer].append(p)
        for idx in members:
            i = np.array(idx, dtype=np.int64)
            self.layers.append((starts[i], n_bins[i].astype(np.int64), offsets[i]))

    def count(self, spikes: np.ndarray) -> np.ndarray:
        """Counts in every bin (``sum(n_bins)`` int64 values)."""
        out = np.zeros(self.n_values, dtype=np.int64)
        for starts, n_bins, offsets in self.layers:
            p = np.searchsorted(starts, spikes, side="right") - 1
            inside = p >= 0
            t, p = spikes[inside], p[inside]
            a = starts[p]
            k = np.floor((t - a) / self.dt_s).astype(np.int64)
            # the bins are defined by their edges a + k * dt: undo rounding of the division
            k -= t < a + k * self.dt_s
            k += t >= a + (k + 1) * self.dt_s
            ok = (k >= 0) & (k < n_bins[p])
            out += np.bincount(offsets[p[ok]] + k[ok], minlength=self.n_values)
        return out


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
