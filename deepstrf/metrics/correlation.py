"""Per-neuron prediction scores, accumulated one batch at a time.

For every neuron, over all its valid held-out bins (stims concatenated):

- ``cc_raw``: Pearson CC between the prediction and the trial-averaged
  response (PSTH);
- ``cc_max``: the noise ceiling of Hsu et al. (2004): the mean CC between
  the PSTHs of random complementary halves of the repeats, ``rho``,
  corrected with Spearman-Brown, ``sqrt(2 rho / (1 + rho))`` (the same
  formula as :func:`~deepstrf.metrics.quality.split_half_ceiling`, here on the
  concatenated held-out data so it matches ``cc_raw``);
- ``cc_norm = cc_raw / cc_max`` (noise-corrected CC; can exceed 1 by noise);
- ``cc_truth``: CC between the prediction and the known expected rate, for
  synthetic sources;
- ``nll`` / ``nll_baseline``: Poisson NLL of the model and of a constant
  mean-rate baseline, and ``bits_per_spike`` = the gain over the baseline.

Only sufficient statistics are kept (a few float64 numbers per neuron and
split), so memory is independent of the amount of held-out data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..datasets.collate import CompactBatch

_MOMENTS = ("n", "x", "y", "xx", "yy", "xy")


def pearson_from_moments(m: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Pearson CC from sums ``n, x, y, xx, yy, xy`` (any shape); NaN where undefined."""
    n = m["n"]
    cov = m["xy"] - m["x"] * m["y"] / n.clamp(min=1)
    vx = m["xx"] - m["x"] ** 2 / n.clamp(min=1)
    vy = m["yy"] - m["y"] ** 2 / n.clamp(min=1)
    den = torch.sqrt(vx.clamp(min=0) * vy.clamp(min=0))
    ok = (n >= 2) & (den > 1e-12 * (1 + n))
    return torch.where(ok, cov / den.clamp(min=1e-300), torch.full_like(cov, math.nan))


def corrcoef_rows(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pearson CC of each row of ``x`` with the same row of ``y`` over ``mask``ed bins."""
    x, y = x.double(), y.double()
    w = torch.ones_like(x) if mask is None else mask.double()
    m = {"n": w.sum(-1), "x": (w * x).sum(-1), "y": (w * y).sum(-1), "xx": (w * x * x).sum(-1),
         "yy": (w * y * y).sum(-1), "xy": (w * x * y).sum(-1)}
    return pearson_from_moments(m)


def spearman_brown_ceiling(rho: torch.Tensor) -> torch.Tensor:
    """``sqrt(2 rho / (1 + rho))`` for ``rho > 0``, NaN otherwise."""
    rho = torch.as_tensor(rho, dtype=torch.float64)
    return torch.where(rho > 0, torch.sqrt(2 * rho.clamp(min=0) / (1 + rho)), torch.full_like(rho, math.nan))


class NeuronScores:
    """Accumulates per-neuron scores over batches of (prediction, responses[, truth]).

    ``baseline_rate`` ``(n_neurons,)``: the constant expected count per bin of
    the mean-rate baseline (e.g. the training mean); without it no
    baseline NLL is computed. ``n_splits`` random repeat splits estimate the
    noise ceiling (seeded, so scores are reproducible).
    """

    def __init__(self, n_neurons: int, baseline_rate: torch.Tensor | None = None, n_splits: int = 16,
                 seed: int = 0, eps: float = 1e-8):
        self.n_neurons = n_neurons
        self.n_splits = n_splits
        self.eps = eps
        self.baseline = None if baseline_rate is None else torch.as_tensor(baseline_rate, dtype=torch.float64)
        self._gen = torch.Generator().manual_seed(seed)
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.psth = {k: z(n_neurons) for k in _MOMENTS}
        self.truth = {k: z(n_neurons) for k in _MOMENTS}
        self.halves = {k: z(n_neurons, n_splits) for k in _MOMENTS}
        self.nll = z(n_neurons)
        self.nll_base = z(n_neurons)
        self.spikes = z(n_neurons)
        self.n_obs = z(n_neurons)

    @staticmethod
    def _add(acc: dict, idx: torch.Tensor, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> None:
        """Add per-row moments of ``x``/``y`` (rows, T) over weights ``w`` into ``acc[idx]``."""
        parts = {"n": w.sum(-1), "x": (w * x).sum(-1), "y": (w * y).sum(-1), "xx": (w * x * x).sum(-1),
                 "yy": (w * y * y).sum(-1), "xy": (w * x * y).sum(-1)}
        for k, v in parts.items():
            acc[k].index_add_(0, idx, v)

    @torch.no_grad()
    def update(self, neurons: torch.Tensor, pred: torch.Tensor, cells: torch.Tensor, repeats: torch.Tensor,
               lengths: torch.Tensor, truth: torch.Tensor | None = None) -> None:
        """Add ``n`` cells: global ``neurons`` ``(n,)``, rates ``pred`` ``(n, T)``,
        NaN-padded responses ``cells`` ``(n, R_max, T)`` with ``repeats``/``lengths``
        ``(n,)``, and optionally the true expected counts ``truth`` ``(n, T)``."""
        idx = torch.as_tensor(neurons, dtype=torch.long).cpu()
        if idx.numel() == 0:
            return
        cells = cells.double().cpu()
        T = cells.shape[-1]
        pred = pred.detach().double().cpu()[:, :T]
        repeats = torch.as_tensor(repeats).cpu()
        lengths = torch.as_tensor(lengths).cpu()
        tmask = (torch.arange(T)[None, :] < lengths[:, None]).double()
        rmask = torch.arange(cells.shape[1])[None, :] < repeats[:, None]  # (n, R_max)
        y = torch.nan_to_num(cells, nan=0.0)
        ysum = (y * rmask[:, :, None]).sum(1)
        R = repeats.double()[:, None]
        psth = ysum / R
        self._add(self.psth, idx, pred, psth, tmask)
        if truth is not None:
            self._add(self.truth, idx, pred, truth.detach().double().cpu()[:, :T], tmask)
        lam = pred.clamp(min=0)
        self.nll.index_add_(0, idx, ((R * lam - ysum * torch.log(lam + self.eps)) * tmask).sum(-1))
        self.spikes.index_add_(0, idx, (ysum * tmask).sum(-1))
        self.n_obs.index_add_(0, idx, (R * tmask).sum(-1))
        if self.baseline is not None:
            mu = self.baseline[idx][:, None].clamp(min=self.eps)
            self.nll_base.index_add_(0, idx, ((R * mu - ysum * torch.log(mu)) * tmask).sum(-1))
        self._update_halves(idx, y, rmask, repeats, tmask)

    def _update_halves(self, idx, y, rmask, repeats, tmask) -> None:
        ok = repeats >= 2
        if not bool(ok.any()):
            return
        idx, y, rmask, repeats, tmask = idx[ok], y[ok], rmask[ok], repeats[ok], tmask[ok]
        half = (repeats // 2)[:, None]
        for k in range(self.n_splits):
            keys = torch.rand(rmask.shape, generator=self._gen).masked_fill(~rmask, 2.0)
            rank = keys.argsort(1).argsort(1)
            a_w = (rank < half).double()
            b_w = ((rank >= half) & (rank < 2 * half)).double()
            a = (y * a_w[:, :, None]).sum(1) / half
            b = (y * b_w[:, :, None]).sum(1) / half
            parts = {"n": tmask.sum(-1), "x": (tmask * a).sum(-1), "y": (tmask * b).sum(-1),
                     "xx": (tmask * a * a).sum(-1), "yy": (tmask * b * b).sum(-1), "xy": (tmask * a * b).sum(-1)}
            for key, v in parts.items():
                self.halves[key][:, k].index_add_(0, idx, v)

    def update_compact(self, batch: CompactBatch, pred: torch.Tensor, truth: torch.Tensor | None = None) -> None:
        """Add every valid cell of a :class:`CompactBatch` with per-cell rates ``(n_cells, T)``."""
        batch.check_rates(pred)
        self.update(batch.neuron_index, pred, batch.padded(torch.float64), batch.repeats, batch.lengths, truth)

    def result(self) -> dict[str, np.ndarray]:
        """Per-neuron arrays (NaN for neurons without held-out data)."""
        rho = pearson_from_moments(self.halves)  # (N, splits)
        valid = ~torch.isnan(rho)
        rho_mean = torch.where(valid.any(1), torch.nan_to_num(rho).sum(1) / valid.sum(1).clamp(min=1),
                               torch.full((self.n_neurons,), math.nan, dtype=torch.float64))
        cc_max = spearman_brown_ceiling(rho_mean)
        cc_raw = pearson_from_moments(self.psth)
        nan = torch.full((self.n_neurons,), math.nan, dtype=torch.float64)
        seen = self.n_obs > 0
        out = {
            "cc_raw": cc_raw,
            "cc_max": cc_max,
            "cc_norm": cc_raw / cc_max,
            "cc_truth": pearson_from_moments(self.truth),
            "split_half_rho": rho_mean,
            "nll": torch.where(seen, self.nll / self.n_obs.clamp(min=1), nan),
            "spikes": self.spikes,
            "n_obs": self.n_obs,
        }
        if self.baseline is not None:
            out["nll_baseline"] = torch.where(seen, self.nll_base / self.n_obs.clamp(min=1), nan)
            gain = (self.nll_base - self.nll) / (self.spikes.clamp(min=1) * math.log(2))
            out["bits_per_spike"] = torch.where(seen & (self.spikes > 0), gain, nan)
        return {k: v.numpy().copy() for k, v in out.items()}

    def aggregate(self, groups: Sequence[str], result: Mapping[str, np.ndarray] | None = None) -> dict[str, dict]:
        """Per-source summary: ``groups[n]`` is neuron ``n``'s source name.

        Per-neuron CCs are summarised by median / mean / quartiles over the
        neurons with a defined value; NLLs and bits per spike pool the
        source's observations (sum over its neurons), NaN like :meth:`result`'s
        for a source without held-out observations (bits per spike: without spikes).
        """
        res = dict(result) if result is not None else self.result()
        groups = np.asarray(list(groups), dtype=object)
        if len(groups) != self.n_neurons:
            raise ValueError(f"groups has {len(groups)} entries for {self.n_neurons} neurons")
        out: dict[str, dict] = {}
        for g in dict.fromkeys(groups.tolist()):
            sel = (groups == g) & (self.n_obs.numpy() > 0)
            summary = {"n_neurons": int(sel.sum())}
            for key in ("cc_raw", "cc_norm", "cc_truth", "cc_max"):
                summary[key] = describe(res[key][sel])
            n_obs, spikes = self.n_obs.numpy()[sel].sum(), self.spikes.numpy()[sel].sum()
            nll = self.nll.numpy()[sel].sum()
            summary["nll"] = _ratio(nll, n_obs)
            summary["spikes"] = float(spikes)
            if self.baseline is not None:
                base = self.nll_base.numpy()[sel].sum()
                summary["nll_baseline"] = _ratio(base, n_obs)
                summary["bits_per_spike"] = _ratio(base - nll, spikes * math.log(2))
            out[g] = summary
        return out


def _ratio(total: float, count: float) -> float:
    """``total / count``; NaN when ``count`` is 0 (nothing observed)."""
    return float(total / count) if count > 0 else math.nan


def describe(values: np.ndarray) -> dict[str, float]:
    """Median, mean, quartiles and count of the finite entries of ``values``."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"n": 0, "median": math.nan, "mean": math.nan, "q25": math.nan, "q75": math.nan}
    q25, med, q75 = np.percentile(v, [25, 50, 75])
    return {"n": int(v.size), "median": float(med), "mean": float(v.mean()), "q25": float(q25), "q75": float(q75)}
