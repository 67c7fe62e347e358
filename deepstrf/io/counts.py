"""The response grid of an imported session: integer counts per (stim, unit, presentation)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..datasets.views import RawRow, ResponseGrid, fill_rows, missing_sentinel


class PresentationCounts(ResponseGrid):
    """Cell ``(s, n)`` = the counts of unit ``n`` over the presentations of stim ``s`` during which it
    was recorded, ``(R, T_s)``; the sentinel when there is none.

    ``counts[s]`` is ``(N, P_s, T_s)`` in the smallest unsigned dtype that holds them and
    ``recorded[s]`` is ``(P_s, N)`` bool; raw reads keep the integer dtype.
    """

    def __init__(self, counts: Sequence[np.ndarray], recorded: Sequence[np.ndarray]) -> None:
        super().__init__(len(counts), counts[0].shape[0] if counts else 0)
        self.counts = list(counts)
        self.recorded = list(recorded)

    def _read_row(self, s: int, neurons: Sequence[int]) -> list[torch.Tensor]:
        rec = self.recorded[s]
        return [torch.from_numpy(self.counts[s][n][rec[:, n]].astype(np.float32)) if rec[:, n].any()
                else missing_sentinel() for n in neurons]

    def _read_raw_rows(self, stims: Sequence[int], neurons: Sequence[int] | None,
                       out: Sequence[np.ndarray] | None) -> list[RawRow]:
        neurons = np.arange(self.n_neurons) if neurons is None else np.asarray(neurons, dtype=np.int64)
        rows = []
        for s in stims:
            rec = self.recorded[s][:, neurons]
            reps = rec.sum(axis=0)
            keep = np.flatnonzero(reps)
            cells = [self.counts[s][neurons[i]][rec[:, i]].reshape(-1) for i in keep.tolist()]
            values = np.concatenate(cells) if cells else np.zeros(0, dtype=self.counts[s].dtype)
            rows.append(RawRow(s, neurons[keep], reps[keep].astype(np.int64),
                               np.full(len(keep), self.counts[s].shape[2], dtype=np.int64), values))
        return fill_rows(rows, out)

    def _mask(self) -> torch.Tensor:
        return torch.from_numpy(np.stack([r.any(axis=0) for r in self.recorded]))
