"""Per-source held-out evaluation of a trained model."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from ..datasets.collate import CompactBatch
from ..metrics import NeuronScores
from ..models import PooledEncodingModel
from .sources import TruthLookup


@torch.no_grad()
def score(model: PooledEncodingModel, batches: Iterable[CompactBatch], *, neuron_uids: list[str],
          baseline: torch.Tensor, truth: TruthLookup | None = None, seed: int = 0) -> NeuronScores:
    """Accumulate per-neuron scores of ``model`` over held-out batches.

    ``neuron_uids[n]`` is the UID of the model's neuron ``n`` (used to find
    the ground truth of each cell).
    """
    model.eval()
    scores = NeuronScores(len(neuron_uids), baseline_rate=baseline, seed=seed)
    for b in batches:
        pred = model.predict(b)
        gt = None
        if truth is not None:
            gt = truth.for_cells(b.stim_meta, b.item_index, [neuron_uids[n] for n in b.neuron_index.tolist()],
                                 pred.shape[1])
        scores.update_compact(b, pred, gt)
    return scores


def per_neuron_table(scores: NeuronScores, groups: list[str]) -> dict[str, list]:
    """JSON-ready per-neuron scores (NaN -> None) with each neuron's source."""
    res = scores.result()
    seen = scores.n_obs.numpy() > 0
    out: dict[str, list] = {"source": [g for g, k in zip(groups, seen) if k],
                            "neuron": np.nonzero(seen)[0].tolist()}
    for key in ("cc_truth", "cc_raw", "cc_norm", "cc_max", "bits_per_spike"):
        out[key] = [None if not np.isfinite(v) else float(v) for v in res[key][seen]]
    return out
