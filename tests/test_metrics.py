"""Per-neuron scores: CC, normalised CC from split halves, CC vs ground truth, baseline, aggregation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deepstrf.datasets.collate import compact_collate
from deepstrf.datasets.synthetic import SyntheticAudioDataset
from deepstrf.metrics import (NeuronScores, corrcoef_rows, describe, pearson, spearman_brown_ceiling,
                              split_half_ceiling)


def _cells(rate: torch.Tensor, R: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.poisson(rate.expand(R, -1).contiguous(), generator=g)


def test_corrcoef_rows_matches_pearson():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 50, generator=g), torch.randn(3, 50, generator=g)
    cc = corrcoef_rows(x, y)
    for i in range(3):
        assert cc[i].item() == pytest.approx(pearson(x[i], y[i]), abs=1e-9)
    mask = torch.zeros(3, 50, dtype=torch.bool)
    mask[:, :20] = True
    assert corrcoef_rows(x, y, mask)[1].item() == pytest.approx(pearson(x[1, :20], y[1, :20]), abs=1e-9)
    assert math.isnan(corrcoef_rows(torch.ones(1, 5), torch.randn(1, 5))[0].item())


def test_scores_perfect_prediction_of_truth():
    T, R = 4000, 10
    t = torch.arange(T, dtype=torch.float64)
    rate = 0.5 + 0.25 * torch.sin(t / 7) + 0.2 * torch.sin(t / 23)
    cells = _cells(rate[None], R, 0)[None]  # (1, R, T)
    sc = NeuronScores(1, baseline_rate=torch.tensor([float(rate.mean())]))
    sc.update(torch.tensor([0]), rate[None], cells, torch.tensor([R]), torch.tensor([T]), truth=rate[None])
    r = sc.result()
    assert r["cc_truth"][0] == pytest.approx(1.0)
    # the truth is the best possible prediction: its normalised CC is ~1
    assert r["cc_norm"][0] == pytest.approx(1.0, abs=0.05)
    # ceiling agrees with the per-cell Hsu estimate of quality.split_half_ceiling
    assert r["cc_max"][0] == pytest.approx(split_half_ceiling(cells[0]), abs=0.03)
    assert r["cc_raw"][0] < r["cc_max"][0] + 0.02
    assert r["bits_per_spike"][0] > 0
    # a constant prediction equal to the baseline gains nothing and has no CC
    sc2 = NeuronScores(1, baseline_rate=torch.tensor([0.3]))
    sc2.update([0], torch.full((1, T), 0.3), cells, [R], [T])
    r2 = sc2.result()
    assert math.isnan(r2["cc_raw"][0]) and r2["bits_per_spike"][0] == pytest.approx(0.0, abs=1e-6)


def test_scores_stream_over_batches_equals_one_batch():
    ds = SyntheticAudioDataset("aa1", scale=0.1, time_scale=0.05, seed=4)
    items = [ds[i] for i in range(len(ds))]
    ids = ds.selected_neurons()
    whole = compact_collate(items, neuron_index=ids)
    pred_whole = whole.psth() * 0.5 + 0.1

    def run(batches):
        sc = NeuronScores(ds.N_neurons, baseline_rate=torch.full((ds.N_neurons,), 0.05), n_splits=4, seed=0)
        for b in batches:
            sc.update_compact(b, b.psth() * 0.5 + 0.1)
        return sc.result()

    one = run([whole])
    parts = run([compact_collate(items[i:i + 1], neuron_index=ids) for i in range(len(items))])
    for key in ("cc_raw", "nll", "nll_baseline", "bits_per_spike", "spikes"):
        np.testing.assert_allclose(one[key], parts[key], rtol=1e-9, equal_nan=True)
    assert pred_whole.shape[0] == whole.n_cells
    # PSTH vs itself (affine): raw CC is exactly 1 where defined
    finite = np.isfinite(one["cc_raw"])
    assert finite.any() and np.allclose(one["cc_raw"][finite], 1.0)


def test_update_compact_refuses_predictions_that_do_not_cover_the_cells():
    ds = SyntheticAudioDataset("aa1", scale=0.1, time_scale=0.05, seed=4)
    b = compact_collate([ds[i] for i in range(2)], neuron_index=ds.selected_neurons())
    T = int(b.lengths.max())
    sc = NeuronScores(ds.N_neurons)
    with pytest.raises(ValueError, match=f"prediction covers {T - 2} bins, cells need {T}"):
        sc.update_compact(b, torch.ones(b.n_cells, T - 2))
    with pytest.raises(ValueError, match=rf"pred must be \(n_cells={b.n_cells}, T\)"):
        sc.update_compact(b, torch.ones(b.n_cells - 1, T))
    assert not sc.n_obs.any()  # nothing was added


def test_split_half_ceiling_and_nan_rules():
    assert spearman_brown_ceiling(torch.tensor(1.0)).item() == pytest.approx(1.0)
    assert spearman_brown_ceiling(torch.tensor(1 / 3)).item() == pytest.approx(math.sqrt(0.5))
    assert math.isnan(spearman_brown_ceiling(torch.tensor(-0.1)).item())
    # one repeat only: no ceiling, raw CC still defined
    sc = NeuronScores(2)
    rate = torch.rand(1, 100, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sc.update([1], rate, _cells(rate, 1, 1)[None], [1], [100])
    r = sc.result()
    assert math.isnan(r["cc_max"][1]) and math.isnan(r["cc_norm"][1]) and np.isfinite(r["cc_raw"][1])
    assert math.isnan(r["cc_raw"][0])  # neuron 0 never seen


def test_aggregate_per_source():
    sc = NeuronScores(4, baseline_rate=torch.full((4,), 0.2))
    g = torch.Generator().manual_seed(3)
    rate = 0.2 + 0.15 * torch.rand(4, 300, generator=g, dtype=torch.float64)
    cells = torch.stack([_cells(rate[i:i + 1], 6, i) for i in range(4)])
    sc.update([0, 1, 2, 3], rate, cells, [6] * 4, [300] * 4, truth=rate)
    agg = sc.aggregate(["A", "A", "B", "B"])
    assert list(agg) == ["A", "B"]
    assert agg["A"]["n_neurons"] == 2 and agg["B"]["cc_truth"]["median"] == pytest.approx(1.0)
    assert agg["A"]["bits_per_spike"] > 0
    with pytest.raises(ValueError):
        sc.aggregate(["A"])
    # a source none of whose neurons has held-out data: NaN like result(), not 0
    sc = NeuronScores(4, baseline_rate=torch.full((4,), 0.2))
    sc.update([0, 1], rate[:2], cells[:2], [6] * 2, [300] * 2)
    empty = sc.aggregate(["A", "A", "B", "B"])["B"]
    assert empty["n_neurons"] == 0 and empty["spikes"] == 0
    assert all(math.isnan(empty[k]) for k in ("nll", "nll_baseline", "bits_per_spike"))
    assert all(math.isnan(sc.result()[k][2]) for k in ("nll", "nll_baseline", "bits_per_spike"))
    silent = NeuronScores(1, baseline_rate=torch.full((1,), 0.2))  # observed, never a spike
    silent.update([0], rate[:1], torch.zeros(1, 6, 300, dtype=torch.float64), [6], [300])
    quiet = silent.aggregate(["A"])["A"]
    assert math.isfinite(quiet["nll"]) and math.isnan(quiet["bits_per_spike"])
    assert math.isnan(silent.result()["bits_per_spike"][0])
    d = describe(np.array([1.0, np.nan, 3.0]))
    assert d["n"] == 2 and d["median"] == 2.0
