"""Per-cell response-reliability statistics (signal power, noise ceiling).

Pure functions on one ``(R, T)`` response cell; the dataset streams cells
through them and aggregates length-weighted across stimuli.
"""

from __future__ import annotations

import itertools
import math

import torch


def signal_noise_power(cell: torch.Tensor) -> tuple[float, float] | None:
    """Sahani & Linden (2003) signal and noise power of one ``(R, T)`` cell.

    Returns ``None`` when the cell has fewer than 2 repeats or 2 bins.
    """
    R, T = cell.shape
    if R < 2 or T < 2:
        return None
    x = cell.double()
    var_psth = x.mean(dim=0).var(unbiased=True)
    total = x.var(dim=1, unbiased=True).mean()
    signal = (R * var_psth - total) / (R - 1)
    return float(signal), float(total - signal)


def split_half_ceiling(cell: torch.Tensor, max_iters: int = 126) -> float | None:
    """Hsu et al. (2004) noise ceiling CCmax of one ``(R, T)`` cell.

    Averages the correlation between the PSTHs of complementary halves of the
    repeats (at most ``max_iters`` splits), then applies the Spearman-Brown
    correction ``sqrt(2 rho / (1 + rho))``. ``None`` when there are fewer
    than 2 repeats or 2 bins, or when the split-half correlation is <= 0.
    """
    R, T = cell.shape
    if R < 2 or T < 2:
        return None
    R -= R % 2
    x = cell[:R].double()
    halves = list(itertools.combinations(range(R), R // 2))
    n_iters = min(len(halves) // 2, max_iters)
    if n_iters == 0:
        return None
    first = torch.tensor(halves[:n_iters])
    second = torch.tensor(halves[::-1][:n_iters])
    a = x[first].mean(1)  # (n_iters, T)
    b = x[second].mean(1)
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    denom = torch.sqrt((a * a).sum(1) * (b * b).sum(1))
    ok = denom > 0
    if not bool(ok.any()):
        return None
    rho = float(((a * b).sum(1)[ok] / denom[ok]).mean())
    if rho <= 0:
        return None
    return math.sqrt(2 * rho / (1 + rho))


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two 1-D tensors; NaN if either is constant."""
    a = a.double() - a.double().mean()
    b = b.double() - b.double().mean()
    denom = torch.sqrt((a * a).sum() * (b * b).sum())
    if denom == 0:
        return float("nan")
    return float((a * b).sum() / denom)
