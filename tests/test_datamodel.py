"""Data model, selection and iteration (CONTRACT §1, §3)."""

import functools

import pytest
import torch
from stream_helpers import LOADER_TIMEOUT_S
from toydata import ToyAudio, ToyVideo, cells_equal
from torch.utils.data import DataLoader

from deepstrf.datasets.audio import AudioNeuralDataset
from deepstrf.datasets.neural_dataset import DatasetValidationError
from deepstrf.datasets.synthetic import SyntheticAudioDataset
from deepstrf.utils.data import compact_collate, concat_neural_datasets, neural_collate


@pytest.fixture
def pool():
    return concat_neural_datasets([ToyAudio(1, S=4, N=5), ToyAudio(2, S=3, N=6)], names=["A", "B"])


def test_attributes_and_aliases():
    d = ToyAudio(1)
    assert d.dt_ms == d.dt == 1.0 and d.get_F() == 8 and d.get_N() == 5 and d.get_S() == 4
    d.neuron_metadata = [{"x": i} for i in range(5)]
    assert d.nrn_meta[2] == {"x": 2}
    d.dt_ms = 2.0
    assert d.dt == 2.0


def test_nrn_masks_cached_and_invalidated():
    d = ToyAudio(1)
    m = d.nrn_masks
    assert d.nrn_masks is m
    assert m[0, 0] and not m[0, 3]  # (s + n + seed) % 4 == 0 is missing
    d.responses[0][0] = torch.full((1, 1), float("nan"))
    assert d.nrn_masks is m and d.nrn_masks[0, 0]
    d._invalidate_nrn_masks()
    assert not d.nrn_masks[0, 0]


def test_masks_reset_the_deepstrf_way_refresh_every_cache():
    d = ToyAudio(1)
    d.select_neuron(0)
    assert len(d) == 3  # neuron 0 has no data for stim 3
    d.responses[1][0] = torch.full((1, 1), float("nan"))
    d._nrn_masks_cache = None  # what deepSTRF's own invalidation does
    assert len(d) == 2 and not d.nrn_masks[1, 0]


class _MinRepeats(ToyAudio):
    """deepSTRF's hook overridden: a cell with fewer than 3 repeats counts as missing."""

    def _compute_nrn_masks(self) -> torch.Tensor:
        m = super()._compute_nrn_masks().clone()
        for s in range(self.get_S()):
            for n in range(self.N_neurons):
                m[s, n] &= self.responses[s][n].shape[0] >= 3
        return m


def test_an_overridden_compute_nrn_masks_decides_len_items_and_selections():
    d = _MinRepeats(1)
    masks = d.nrn_masks
    assert not torch.equal(masks, ToyAudio(1).nrn_masks)
    assert torch.equal(d.coverage.to_dense(), masks)
    visible = [s for s in range(d.get_S()) if masks[s].any()]
    assert d.visible_stims() == visible and len(d) == len(visible)
    assert all(torch.equal(d[i]["valid_mask"], masks[s]) for i, s in enumerate(visible))
    d.select_stims([visible[0]])
    assert d._selected() == masks[visible[0]].nonzero().flatten().tolist()
    d.reset_stim_selection()
    d.select_neuron(0)
    assert len(d) == int(masks[:, 0].sum()) < int(ToyAudio(1).nrn_masks[:, 0].sum())
    pool = d + ToyAudio(2)  # the source's override decides its block
    assert torch.equal(pool.nrn_masks[:d.get_S(), :d.N_neurons], masks)



class _FromCoverage(ToyAudio):
    """An override that reads ``coverage`` (the responses' pairs) and drops neuron 0."""

    def _compute_nrn_masks(self):
        masks = self.coverage.to_dense().clone()
        masks[:, 0] = False
        return masks


def test_an_override_of_compute_nrn_masks_may_read_coverage():
    """Before: coverage asked nrn_masks, which asked the override, which asked coverage (RecursionError)."""
    d = _FromCoverage(1)
    assert not d.nrn_masks[:, 0].any() and torch.equal(d.nrn_masks[:, 1:], ToyAudio(1).nrn_masks[:, 1:])
    assert torch.equal(d.coverage.to_dense(), d.nrn_masks)

@pytest.mark.parametrize("make", ["plain", "pool"])
def test_selections_edited_in_place_are_what_items_show(make, pool):
    """deepSTRF's I and S_sel are plain lists that user code appends to or clears."""
    d = ToyAudio(1) if make == "plain" else pool
    d.I = [0]
    assert len(d) == 3
    d.I.append(3)  # neuron 0 has data for stims 0-2, neuron 3 for stims 1-3
    assert len(d) == 4 and [d[i]["valid_mask"].shape[0] for i in range(4)] == [2] * 4
    d.I.clear()
    d.I.append(3)
    assert len(d) == 3 and all(bool(d[i]["valid_mask"].all()) for i in range(3))
    d.I[0] = 0
    assert len(d) == 3 and all(bool(d[i]["valid_mask"].all()) for i in range(3))
    d.I.clear()
    d.S_sel = [0]
    assert len(d) == 1
    d.S_sel.extend([1, 2])
    assert len(d) == 3 and [d[i]["stim_meta"]["uid"] for i in range(3)] == ["a1-s0", "a1-s1", "a1-s2"]


def test_mask_follows_edits_on_lazy_views(pool):
    pool.responses[0][0] = torch.full((1, 1), float("nan"))
    pool._invalidate_nrn_masks()
    assert not pool.nrn_masks[0, 0]
    pool.responses[0][7] = torch.ones(2, 12)  # a cross-block cell, now recorded
    pool._invalidate_nrn_masks()
    assert pool.nrn_masks[0, 7] and pool.responses[0][7].sum() == 24


def test_population_selection_hides_other_source(pool):
    assert len(pool) == 7
    pool.select_population(list(range(5)))
    assert len(pool) == 4
    assert pool[0]["stim_meta"]["dataset"] == "A"
    assert len(pool[0]["responses"]) == 5 and pool[0]["valid_mask"].shape == (5,)
    with pytest.raises(IndexError):
        pool[4]
    pool.reset_pop_selection()
    assert len(pool) == 7


def test_stim_selection_hides_neurons_without_data(pool):
    pool.select_stims([4, 5])  # two B stims
    assert len(pool) == 2
    assert pool._selected() == list(range(5, 11))
    assert len(pool[0]["responses"]) == 6
    pool.select_stims_by_attr("dataset", "A")
    assert len(pool) == 4 and pool._selected() == [0, 1, 2, 3, 4]
    assert pool.select_stims_by_attr("type", "nope") == [] and len(pool) == 0 and pool._selected() == []
    pool.reset_stim_selection()
    assert len(pool) == 7


def test_attribute_and_predicate_selection(pool):
    pool.nrn_meta[0].pop("area")
    assert pool.select_pop_by_nrn_attr("area", "MLd") == [2, 4, 5, 7, 9]
    assert pool.I == [2, 4, 5, 7, 9]
    assert pool.get_nrn_meta()[0]["uid"] == "a1-n2"
    assert pool.select_pop_by_nrn_predicate(lambda m: m["area"] == "L") == [1, 3, 6, 8, 10]
    sel = pool.select_pop_by_stim_attr("dataset", "B")
    assert sel == list(range(5, 11))
    assert pool.select_pop_by_stim_predicate(lambda m: m["missing"]) == []
    assert pool.select_stims_by_predicate(lambda m: m["uid"].endswith("s0")) == [0, 4]


def test_select_errors_are_assertion_errors(pool):
    for call in (lambda: pool.select_stim(7), lambda: pool.select_stims([0, -1]),
                 lambda: pool.select_neuron(11), lambda: pool.select_population([0, 99])):
        with pytest.raises(AssertionError):
            call()
    pool.select_stim(6)
    assert len(pool) == 1


def test_getitem_index_types(pool):
    assert pool[-1]["stim_meta"] == pool[6]["stim_meta"]
    many = pool[1:3]
    assert sorted(many) == ["responses", "stim_meta", "stims", "valid_mask"]
    assert len(many["stims"]) == 2 and isinstance(many["responses"], list)
    assert pool[[0, 6]]["stim_meta"][1]["uid"] == "a2-s2"
    for bad in ("0", 1.0, None):
        with pytest.raises(TypeError):
            pool[bad]
    with pytest.raises(IndexError):
        pool[-8]


def test_a_video_subclass_that_never_sets_its_frame_size_builds():
    from deepstrf.datasets.video import VideoNeuralDataset
    from toydata import fill

    class Clips(VideoNeuralDataset):  # as a deepSTRF loader may write it: H and W left unset
        def __init__(self, seed):
            super().__init__(path=f"clips-{seed}", dt_ms=10.0)
            fill(self, seed, 3, 4, (1, 6, 5), f"c{seed}")

    a = Clips(1)
    assert (a.H, a.W) == (6, 5) and len(a + Clips(2)) > 0


def test_waveform_stimuli_are_locked_to_the_response_bins():
    d = ToyAudio(1, S=2, N=2)
    d.return_waveform, d.audio_fs, d.dt = True, 2000, 1.0  # 2 samples per bin
    d.stims = [torch.zeros(1, 2 * d.responses[s][0].shape[-1]) for s in range(2)]
    d.validate()
    d.stims[1] = torch.zeros(1, 7)
    with pytest.raises(DatasetValidationError, match=r"waveform stim 1 has 7 samples; its responses have 15 bins "
                                                     r"of 2 samples: pad or crop it to 30"):
        d.validate()
    d.audio_fs = 1500.5
    with pytest.raises(DatasetValidationError, match="positive int"):
        d.validate()
    d.audio_fs, d.dt = 1500, 1.0
    with pytest.raises(DatasetValidationError, match="whole number of samples per bin"):
        d.validate()


def test_validate_refuses_inconsistencies():
    d = ToyAudio(1)
    d.stims = d.stims[:-1]
    with pytest.raises(DatasetValidationError, match=r"len\(self.stims\) \(3\) must equal len\(self.stim_meta\) \(4\)"):
        d.validate()
    d = ToyAudio(1)
    d.responses[1][2] = torch.zeros(5)
    with pytest.raises(AssertionError, match=r"responses\[1\]\[2\] must be a 2-D"):
        d.validate()
    d = ToyVideo(1)
    d.H = 0
    with pytest.raises(ValueError, match="self.H must be a positive int"):
        d.validate()


def test_transforms_match_their_definition():
    d = ToyAudio(1)
    raw = d.responses[0][1].clone()
    d.smooth_responses(5.0)
    assert d.responses[0][1].shape == raw.shape and not torch.equal(d.responses[0][1], raw)
    d = ToyAudio(1)
    stats = d.normalize_responses("max")
    peak = max(float(d.responses[s][0].abs().max()) for s in range(4) if d.nrn_masks[s, 0])
    assert peak == pytest.approx(1.0) and stats["scale"].shape == (5,)
    d = ToyAudio(1)
    d.standardize_stims()
    cat = torch.cat(list(d.stims), dim=-1)
    assert torch.allclose(cat.mean(dim=(0, 2)), torch.zeros(8), atol=1e-5)
    assert torch.allclose(cat.std(dim=(0, 2)), torch.ones(8), atol=1e-4)


def test_standardize_stims_of_uint8_frames_in_memory_and_stored(tmp_path):
    """The mean and std were cast to uint8 and x - mean wrapped around (the result was far from
    standardised); now integer stimuli are standardised in float32, store-backed alike."""
    import deepstrf

    v = ToyVideo(1)
    v.stims = [(x.abs() * 60).clamp(max=255).to(torch.uint8) for x in v.stims]
    deepstrf.save_dataset(v, str(tmp_path / "v.zarr"), progress=False)
    stored = deepstrf.open_dataset(str(tmp_path / "v.zarr"))
    floats = torch.cat([x.double().flatten() for x in v.stims])
    for d in (v, stored):
        stats = d.standardize_stims(per_band=False)
        assert stats["mean"].dtype == torch.float32 and float(stats["mean"]) == pytest.approx(float(floats.mean()), rel=1e-6)
        out = torch.cat([d.stims[s].flatten() for s in range(d.get_S())])
        assert out.dtype == torch.float32
        assert float(out.mean()) == pytest.approx(0, abs=1e-5) and float(out.std()) == pytest.approx(1, abs=1e-4)


def _dense(as_list: bool, dtype: torch.dtype = torch.float32) -> AudioNeuralDataset:
    """Responses as one (S, N, R, T) tensor (deepSTRF accepts one), or the same values as lists."""
    d = AudioNeuralDataset(path="dense", dt_ms=1.0)
    g = torch.Generator().manual_seed(0)
    d.F, d.N_neurons = 3, 2
    d.stims = [torch.rand(1, 3, 6, generator=g) for _ in range(4)]
    dense = torch.poisson(torch.ones(4, 2, 3, 6), generator=g).to(dtype)
    d.responses = [[dense[s, n].clone() for n in range(2)] for s in range(4)] if as_list else dense
    d.stim_meta, d.nrn_meta = [{} for _ in range(4)], [{}, {}]
    d.validate()
    return d


@pytest.mark.parametrize("transform", [lambda d: d.smooth_responses(5.0), lambda d: d.normalize_responses("zscore"),
                                       lambda d: d.normalize_responses("max")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transforms_of_a_dense_responses_tensor_write_it_in_place(transform, dtype):
    d, listed = _dense(False, dtype), _dense(True, dtype)
    dense = d.responses
    transform(d)
    transform(listed)
    assert d.responses is dense and dense.dtype == dtype
    assert all(torch.allclose(dense[s, n], listed.responses[s][n]) for s in range(4) for n in range(2))


def test_lazy_transforms_equal_eager_ones():
    lazy = SyntheticAudioDataset("aa1", scale=0.05, time_scale=0.02, seed=4)
    eager = lazy.to_memory()
    for d in (lazy, eager):
        d.smooth_responses(7.0)
        d.normalize_responses("zscore", stim_indices=[0, 1])
        d.standardize_stims(stim_indices=[0])
    assert isinstance(eager.responses, list) and not isinstance(lazy.responses, list)
    for s in range(lazy.get_S()):
        assert torch.allclose(lazy.stims[s], eager.stims[s])
        for n in range(lazy.N_neurons):
            a, b = lazy.responses[s][n], eager.responses[s][n]
            assert a.shape == b.shape and torch.allclose(torch.nan_to_num(a), torch.nan_to_num(b), atol=1e-5)


def test_a_bad_smoothing_window_is_refused_when_asked_not_when_read(pool):
    """A lazy dataset records the transform: a bad window must fail at the call, not in a read."""
    for d in (ToyAudio(1), pool):
        with pytest.raises(AssertionError, match="window_ms and dt_ms must be positive"):
            d.smooth_responses(-1)
        assert cells_equal(d[0]["responses"][0], ToyAudio(1)[0]["responses"][0])


def test_neuron_quality_streams_one_stim_at_a_time():
    d = SyntheticAudioDataset("aa1", scale=0.05, time_scale=0.05, seed=2)
    q = d.compute_neuron_quality()
    assert q["snr"].shape == (d.N_neurons,) and "ccmax" in d.nrn_meta[0]
    assert torch.isfinite(q["ccmax"]).all() and ((q["ccmax"] > 0) & (q["ccmax"] <= 1)).all()


def _worker_pool():
    a = SyntheticAudioDataset("aa1", scale=0.1, time_scale=0.02, seed=1)
    return a, concat_neural_datasets([a, ToyAudio(3, F=32), SyntheticAudioDataset("aa2", scale=0.03, time_scale=0.02, seed=5)])


def test_dataloader_with_workers_over_selected_pool():
    a, pool = _worker_pool()
    pool.select_pop_by_nrn_attr("dataset", "AA1")
    assert len(pool) == a.get_S()
    loader = DataLoader(pool, batch_size=2, num_workers=2, collate_fn=neural_collate, timeout=LOADER_TIMEOUT_S)
    seen = [m["uid"] for batch in loader for m in batch["stim_meta"]]
    assert sorted(seen) == sorted(m["uid"] for m in a.stim_meta)
    batch = next(iter(loader))
    assert batch["responses"].shape[1] == a.N_neurons
    assert torch.equal(batch["valid_mask"], ~batch["responses"].isnan())
    compact = DataLoader(pool, batch_size=3, num_workers=2, timeout=LOADER_TIMEOUT_S,
                         collate_fn=functools.partial(compact_collate, neuron_index=pool.selected_neurons()))
    total = sum(int(b.n_cells) for b in compact)
    assert total == int(pool.nrn_masks[:, : a.N_neurons].sum())


def test_items_equal_reference_loop(pool):
    pool.select_population([0, 6, 7])
    sel = pool._selected()
    for i, s in enumerate(pool._iter_idx):
        item = pool[i]
        assert all(cells_equal(item["responses"][k], pool.responses[s][n]) for k, n in enumerate(sel))
        assert torch.equal(item["valid_mask"], pool.nrn_masks[s, sel])
