"""Opt-in conversions (re-binning, band resampling) and per-source held-out splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepstrf.datasets import views
from deepstrf.datasets.audio import AudioNeuralDataset
from deepstrf.datasets.resample import interpolate_bands, rebin_counts, rebin_dataset, resample_frequency
from deepstrf.datasets.splits import heldout_split, source_test_indices, train_val_test_split
from deepstrf.datasets.synthetic import SyntheticAudioDataset
from deepstrf.errors import IncompatibleDatasetsError
from deepstrf.utils.data import concat_neural_datasets

from toydata import ToyAudio, ToyVideo, cells_equal


def test_rebin_counts_exact_and_drops_partial_bin():
    cell = torch.arange(2 * 11, dtype=torch.int16).reshape(2, 11)
    out = rebin_counts(cell, 5)
    assert out.shape == (2, 2) and not out.is_floating_point()
    assert out.tolist() == [[sum(range(5)), sum(range(5, 10))], [sum(range(11, 16)), sum(range(16, 21))]]
    sentinel = views.missing_sentinel()
    assert rebin_counts(sentinel, 5) is sentinel


def test_rebin_dataset_in_memory():
    ds = ToyAudio(seed=1, S=4, N=5, F=8, dt_ms=1.0)
    before = [[c.clone() for c in row] for row in ds.responses]
    r = rebin_dataset(ds, 3.0)
    assert r is not ds and r.dt_ms == 3.0 and r.F == 8 and isinstance(r, AudioNeuralDataset)
    assert torch.equal(r.nrn_masks, ds.nrn_masks)
    for s in range(ds.get_S()):
        T = ds.stims[s].shape[-1]
        assert r.stims[s].shape == (1, 8, T // 3)
        assert torch.allclose(r.stims[s][..., 0], ds.stims[s][..., :3].mean(-1))
        for n in range(ds.N_neurons):
            c, rc = ds.responses[s][n], r.responses[s][n]
            if views.is_missing(c):
                assert views.is_missing(rc)
            else:
                assert rc.shape == (c.shape[0], T // 3)
                assert torch.equal(rc.sum(1), c[:, :T // 3 * 3].sum(1))
    # the source is untouched; metadata copied, not shared
    assert all(cells_equal(a, b) for ra, rb in zip(before, ds.responses) for a, b in zip(ra, rb))
    assert ds.dt_ms == 1.0 and r.stim_meta == ds.stim_meta and r.stim_meta[0] is not ds.stim_meta[0]
    # batched raw reads give the same counts as cell reads
    rows = views.read_raw_rows(r.responses, [1, 2])
    for row in rows:
        for n, cell in zip(row.neurons.tolist(), row.cells()):
            assert np.array_equal(cell, r.responses[row.stim][n].numpy())
    # editing the derived dataset never reaches the source
    r.responses[0][0] = torch.zeros(2, 2)
    assert not torch.equal(ds.responses[0][0], torch.zeros(2, 2)) or ds.responses[0][0].shape != (2, 2)


def test_rebin_refuses_non_multiple_with_clear_error():
    ds = ToyAudio(seed=0, dt_ms=2.0)
    for bad in (3.0, 1.0, 5.0, 0.0, -2.0):
        with pytest.raises(ValueError, match="dt_ms"):
            rebin_dataset(ds, bad)
    with pytest.raises(ValueError, match=r"integer multiple of 2\.0 ms"):
        rebin_dataset(ds, 5.0)
    assert rebin_dataset(ds, 2.0).dt_ms == 2.0
    with pytest.raises(TypeError):
        rebin_dataset([1, 2], 2.0)


def test_rebin_keeps_synthetic_counts_total_and_pool_structure():
    a = SyntheticAudioDataset("aa1", scale=0.1, time_scale=0.01, seed=3)
    b = SyntheticAudioDataset("aa2", scale=0.03, time_scale=0.01, seed=4)
    pool = concat_neural_datasets([a, b], names=["A", "B"])
    r = rebin_dataset(pool, 5.0)
    assert [n for n, _, _ in r.source_blocks()] == ["A", "B"] and r.dt_ms == 5.0
    assert [m["dataset"] for m in r.nrn_meta] == [m["dataset"] for m in pool.nrn_meta]
    s, n = 0, int(a.nrn_masks[0].nonzero()[0])
    T = a.stims[0].shape[-1] // 5 * 5
    assert r.responses[s][n].sum() == a.responses[s][n][:, :T].sum()


def test_rebin_video():
    v = ToyVideo(seed=2, dt_ms=1.0)
    r = rebin_dataset(v, 2.0)
    assert (r.H, r.W) == (v.H, v.W) and r.stims[0].shape[-1] == v.stims[0].shape[-1] // 2


def test_resample_frequency_makes_ns1_poolable():
    aa = rebin_dataset(SyntheticAudioDataset("aa1", scale=0.1, time_scale=0.02, seed=1), 5.0)
    ns = SyntheticAudioDataset("ns1", scale=0.1, time_scale=0.05, seed=2)
    with pytest.raises(IncompatibleDatasetsError, match="F mismatch"):
        aa + ns
    ns32 = resample_frequency(ns, 32)
    assert ns.F == 34 and ns32.F == 32 and ns32.stims[0].shape[-2] == 32
    assert torch.allclose(ns32.stims[0][:, 0], ns.stims[0][:, 0])  # end bands map onto each other
    assert torch.allclose(ns32.stims[0][:, -1], ns.stims[0][:, -1])
    assert cells_equal(ns32.responses[0][0], ns.responses[0][0])
    pool = aa + ns32
    assert pool.F == 32 and pool.N_neurons == aa.N_neurons + ns.N_neurons
    with pytest.raises(TypeError):
        resample_frequency(ToyVideo(), 4)
    with pytest.raises(ValueError):
        resample_frequency(ns, 0)


def test_interpolate_bands_linear():
    x = torch.linspace(0, 1, 5)[None, :, None].expand(1, 5, 3)  # linear ramp over F
    y = interpolate_bands(x, 9)
    assert torch.allclose(y[0, :, 0], torch.linspace(0, 1, 9), atol=1e-6)


def test_rebin_store_backed_source(tmp_path):
    import deepstrf

    src = SyntheticAudioDataset("aa1", scale=0.1, time_scale=0.01, seed=5)
    deepstrf.save_dataset(src, str(tmp_path / "a.zarr"))
    opened = deepstrf.open_dataset(str(tmp_path / "a.zarr"))
    r = rebin_dataset(opened, 5.0)
    ref = rebin_dataset(src, 5.0)
    rows = views.read_raw_rows(r.responses, [0, 1])
    for row in rows:
        assert row.values.dtype.kind in "iu"  # stored integer counts stay integers
        for n, cell in zip(row.neurons.tolist(), row.cells()):
            assert np.array_equal(cell, ref.responses[row.stim][n].numpy())
    assert torch.allclose(r.stims[1], ref.stims[1])


# -- splits ---------------------------------------------------------------------------------
def test_heldout_split_per_source_reproducible_no_leakage():
    a = SyntheticAudioDataset("aa1", scale=0.3, time_scale=0.01, seed=1)
    b = SyntheticAudioDataset("aa2", scale=0.1, time_scale=0.01, seed=2)
    pool = concat_neural_datasets([a, b], names=["AA1", "AA2"])
    sp = heldout_split(pool, 0.25, seed=7)
    assert sp == heldout_split(pool, 0.25, seed=7)
    assert sp.test != heldout_split(pool, 0.25, seed=8).test
    assert not set(sp.train) & set(sp.test)
    assert sorted(sp.train + sp.test) == list(range(pool.get_S()))
    for name, stims, _ in pool.source_blocks():
        test = sp.by_source[name]["test"]
        assert test and all(s in stims for s in test)
        assert len(test) == max(1, round(0.25 * len(stims)))
    # a source split alone (same name) holds out the same stims as inside the pool
    alone = heldout_split(a, 0.25, seed=7, names=["AA1"])
    assert alone.test == sp.by_source["AA1"]["test"]
    # selecting the split on the dataset
    sp.select(pool, "test")
    assert set(pool.visible_stims()) <= set(sp.test)
    pool.reset_stim_selection()


def test_heldout_split_group_by_prevents_shared_stimulus_leakage():
    a = ToyAudio(seed=0, S=6)
    b = ToyAudio(seed=1, S=6)
    for m_a, m_b in zip(a.stim_meta, b.stim_meta):
        m_b["sound"] = m_a["sound"] = m_a["uid"]  # the same six sounds played in both labs
    pool = concat_neural_datasets([a, b], names=["A", "B"])
    sp = heldout_split(pool, 0.34, seed=0, group_by="sound")
    sounds = lambda idx: {pool.stim_meta[s]["sound"] for s in idx}  # noqa: E731
    assert not sounds(sp.train) & sounds(sp.test)
    assert sp.excluded and not set(sp.excluded) & set(sp.train)


def test_train_val_test_split_group_by_keeps_shared_stimuli_out_of_train_vs_val_too():
    a, b = ToyAudio(seed=0, S=12), ToyAudio(seed=1, S=12)
    for i, (m_a, m_b) in enumerate(zip(a.stim_meta, b.stim_meta)):
        m_a["sound"] = m_b["sound"] = f"song{i % 6}"  # six sounds, each twice per lab
    pool = concat_neural_datasets([a, b], names=["A", "B"])
    p = train_val_test_split(pool, 0.2, 0.2, seed=0, group_by="sound")
    sounds = lambda idx: {pool.stim_meta[s]["sound"] for s in idx}  # noqa: E731
    assert p["val"] and p["train"]
    assert not sounds(p["train"]) & sounds(p["test"]) and not sounds(p["train"]) & sounds(p["val"])
    assert not sounds(p["val"]) & sounds(p["test"])
    # every stim is in exactly one part, or reported as excluded from training
    parts = p["train"] + p["val"] + p["test"] + p["excluded"]
    assert sorted(parts) == list(range(pool.get_S()))
    assert set(heldout_split(pool, 0.2, seed=0, group_by="sound").excluded) <= set(p["excluded"])
    plain = train_val_test_split(pool, 0.2, 0.2, seed=0)
    assert plain["excluded"] == [] and plain["test"] == p["test"]


@pytest.mark.parametrize("val_fraction", [1.0, -0.1, float("nan")])
def test_train_val_test_split_names_a_bad_val_fraction(val_fraction):
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        train_val_test_split(ToyAudio(seed=0, S=6), 0.2, val_fraction=val_fraction)


def test_source_test_indices_bounds():
    assert len(source_test_indices(2, "x", 0, 0.9)) == 1
    with pytest.raises(ValueError):
        source_test_indices(1, "x")
    with pytest.raises(ValueError):
        source_test_indices(10, "x", test_fraction=1.0)
    with pytest.raises(ValueError, match="seed must be a whole number of at least 0"):
        source_test_indices(10, "x", seed=-1)
    with pytest.raises(ValueError, match="seed must be a whole number of at least 0"):
        heldout_split(ToyAudio(seed=0, S=6), seed=-1)


def waveforms(seed: int, bins: list[int], fs: int = 2000, dt_ms: float = 5.0) -> AudioNeuralDataset:
    """A waveform-mode dataset (deepSTRF's return_waveform): stims (1, bins * hop) samples."""
    d = AudioNeuralDataset(f"wave-{seed}", dt_ms=dt_ms)
    d.F, d.audio_fs, d.return_waveform = 1, fs, True
    g = torch.Generator().manual_seed(seed)
    d.stims = [torch.randn(1, T * d.hop, generator=g) for T in bins]
    d.responses = [[torch.poisson(torch.ones(2, T), generator=g)] for T in bins]
    d.stim_meta, d.nrn_meta, d.N_neurons = [{"uid": f"w{seed}-{s}"} for s in range(len(bins))], [{}], 1
    d.validate(deep=True)
    return d


def test_rebinned_waveforms_are_cropped_with_their_responses_and_keep_the_flag():
    """Before: the responses dropped their trailing partial bin but the waveform kept every sample
    (9 bins of 10 samples -> 4 bins of 20 and still 90 samples), and return_waveform was lost."""
    src = waveforms(0, [10, 9, 6])
    out = rebin_dataset(src, 10.0)
    assert out.return_waveform and out.hop == 20
    assert [(out.stims[s].shape[-1], out.responses[s][0].shape[-1]) for s in range(3)] == [(100, 5), (80, 4), (60, 3)]
    assert torch.equal(out.stims[1], src.stims[1][..., :80])
    out.to_memory().validate(deep=True)
    assert concat_neural_datasets([src, waveforms(1, [4])]).return_waveform
