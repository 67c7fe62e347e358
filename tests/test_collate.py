"""Batch formats (CONTRACT §4)."""

import warnings

import pytest
import torch
from toydata import ToyAudio

from deepstrf.utils.data import (SourceBatchSampler, compact_collate, concat_neural_datasets,
                                 fill_missing_data, neural_collate)


@pytest.fixture
def pool():
    return concat_neural_datasets([ToyAudio(1, S=4, N=5), ToyAudio(2, S=3, N=6)], names=["A", "B"])


def test_neural_collate_pads_like_deepstrf(pool):
    items = [pool[0], pool[6]]
    b = neural_collate(items)
    T0, T6 = pool.stims[0].shape[-1], pool.stims[6].shape[-1]
    assert b["stims"].shape == (2, 1, 8, T6)
    assert not torch.isnan(b["stims"]).any() and (b["stims"][0, ..., T0:] == 0).all()
    assert b["responses"].shape == (2, 11, 4, T6)
    assert torch.equal(b["valid_mask"], ~b["responses"].isnan())
    assert torch.isnan(b["responses"][0, 5:]).all()  # cross-block
    r = pool.responses[0][0]
    assert torch.equal(b["responses"][0, 0, : r.shape[0], : r.shape[1]], r)
    assert b["stim_meta"] == [items[0]["stim_meta"], items[1]["stim_meta"]]
    items[0]["behav"] = 1
    items[1]["behav"] = 2
    assert neural_collate(items)["behav"] == [1, 2]


def test_compact_batch_holds_exactly_the_valid_cells(pool):
    items = [pool[i] for i in range(len(pool))]
    dense = neural_collate(items)
    c = compact_collate(items, neuron_index=pool.selected_neurons())
    assert c.n_cells == int(pool.nrn_masks.sum())
    assert c.values.numel() == int(dense["valid_mask"].sum())
    padded = c.padded()
    for k in range(c.n_cells):
        b, n = int(c.item_index[k]), int(c.neuron_index[k])
        r, t = int(c.repeats[k]), int(c.lengths[k])
        assert torch.equal(padded[k, :r, :t], dense["responses"][b, n, :r, :t])
    psth = c.psth()
    k = 3
    b, n, t = int(c.item_index[k]), int(c.neuron_index[k]), int(c.lengths[k])
    assert torch.allclose(psth[k, :t], dense["responses"][b, n, :, :t].nanmean(0))
    assert c.nbytes() < dense["responses"].numel() * 4 / 2
    assert c["stim_meta"] == dense["stim_meta"] and torch.equal(c["stims"], dense["stims"])


def test_compact_keeps_integer_dtype_and_global_neuron_ids(pool):
    pool.select_population([7, 9])
    items = [{**pool[i], "responses": [r.to(torch.uint8) if r.shape != (1, 1) else r for r in pool[i]["responses"]]}
             for i in range(len(pool))]
    c = compact_collate(items, neuron_index=pool.selected_neurons())
    assert c.values.dtype == torch.uint8
    assert set(c.neuron_index.tolist()) <= {7, 9}
    assert c.repeat_sum().dtype == torch.float32


def test_source_batch_sampler_is_homogeneous_and_complete(pool):
    sampler = SourceBatchSampler(pool, batch_size=2, seed=3)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(pool)))
    for b in batches:
        assert len({pool[i]["stim_meta"]["dataset"] for i in b}) == 1
    sampler.set_epoch(1)
    assert list(sampler) != batches or len(batches) < 3
    assert len(sampler) == len(batches) == 4


def test_fill_missing_data_errors():
    with pytest.raises(ValueError):
        fill_missing_data([], dims=-1)
    with pytest.raises(ValueError, match="Dimension 0 mismatch"):
        fill_missing_data([torch.zeros(2, 3), torch.zeros(3, 3)], dims=-1)
    out = fill_missing_data([torch.ones(2, 3), torch.ones(2, 5)], dims=[-1], value=-1)
    assert out.shape == (2, 2, 5) and out[0, 0, 4] == -1


def test_deepstrf_names_of_the_facade():
    from toydata import ToyAudio

    from deepstrf.utils.data import ResponseSmoothingTransform, concatenate_datasets, hanning_smooth

    batch = torch.poisson(torch.ones(2, 3, 4, 50))
    smooth = ResponseSmoothingTransform(dt_ms=2, window_size_ms=21)
    assert torch.equal(smooth(batch), hanning_smooth(batch, window_ms=21, dt_ms=2))
    a, b = ToyAudio(1), ToyAudio(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # deepSTRF's concatenate_datasets does not warn: code run with -W error
        pooled = concatenate_datasets(a, b)
    assert pooled.get_S() == a.get_S() + b.get_S() and pooled.N_neurons == a.N_neurons + b.N_neurons


@pytest.mark.parametrize("window_ms, dt_ms", [(0, 1), (-1, 1), (21, 0), (float("nan"), 1)])
def test_a_bad_smoothing_window_is_refused_as_deepstrf_asserts(window_ms, dt_ms):
    from deepstrf.utils.data import hanning_smooth

    for error in (AssertionError, ValueError):
        with pytest.raises(error, match="window_ms and dt_ms must be positive"):
            hanning_smooth(torch.ones(1, 5), window_ms, dt_ms)


def uint8_video(tmp_path):
    """A video source of uint8 frames with missing pairs and counts no uint8 holds (300, 1.5), saved."""
    from toydata import ToyVideo

    import deepstrf

    v = ToyVideo(0, S=2, N=4)
    v.stims = [(x.abs() * 60).clamp(max=255).to(torch.uint8) for x in v.stims]
    v.responses[0][1][0, 0], v.responses[0][2][0, 0] = 300.0, 1.5
    deepstrf.save_dataset(v, str(tmp_path / "v.zarr"), progress=False)
    return v, str(tmp_path / "v.zarr")


def test_dense_batches_of_integer_frames_hold_float32_responses(tmp_path):
    from deepstrf import StreamingNeuralDataset

    v, url = uint8_video(tmp_path)
    ref = neural_collate([v[0], v[1]])
    assert ref["stims"].dtype == torch.uint8 and ref["responses"].dtype == torch.float32
    assert ref["responses"][0, 1, 0, 0] == 300 and ref["responses"][0, 2, 0, 0] == 1.5
    assert torch.isnan(ref["responses"][0, 0]).all() and not ref["valid_mask"][0, 0].any()  # a missing pair
    compact = next(iter(StreamingNeuralDataset(url, batch_size=2, shuffle=False)))
    streamed = [next(iter(StreamingNeuralDataset(url, batch_size=2, collate="dense", shuffle=False, **kw)))
                for kw in ({}, {"device": "cpu"})] + [compact.to_dense(range(v.N_neurons))]
    for b in streamed:
        assert b["responses"].dtype == torch.float32
        assert torch.equal(b["responses"].nan_to_num(-1), ref["responses"].nan_to_num(-1))
        assert torch.equal(b["valid_mask"], ref["valid_mask"]) and torch.equal(b["stims"], ref["stims"])


def test_stimuli_of_two_dtypes_are_refused_alike_in_memory_and_streamed():
    """uint8 frames and float32 frames in one batch: streamed batches cast every stim to the first
    item's dtype (float frames in [0, 1) became 0); now both paths refuse, naming the items."""
    from toydata import ToyVideo

    from deepstrf import StreamingNeuralDataset

    u8, f32 = ToyVideo(0, S=2), ToyVideo(1, S=2)
    u8.stims = [(x.abs() * 60).clamp(max=255).to(torch.uint8) for x in u8.stims]
    pool = concat_neural_datasets([u8, f32], names=["u8", "f32"])
    items = [pool[i] for i in range(len(pool))]
    for collate in (neural_collate, compact_collate):
        with pytest.raises(ValueError, match=r"item 2 \(uid 'v1-s0'\) has torch.float32 stimuli.*uint8"):
            collate(items)
    for fmt in ("compact", "dense"):
        with pytest.raises(ValueError, match=r"item 2 \(uid 'v1-s0'\) has torch.float32 stimuli.*source_homogeneous"):
            next(iter(StreamingNeuralDataset(pool, batch_size=4, shuffle=False, collate=fmt)))
        batches = list(StreamingNeuralDataset(pool, batch_size=2, shuffle=False, collate=fmt, source_homogeneous=True))
        assert sorted(str(b["stims"].dtype) for b in batches) == ["torch.float32", "torch.uint8"]



def test_streamed_batches_take_float32_and_float64_stimuli_together():
    """A pool of a float32 and a float64 source streamed as it always was (cast to the first item's
    dtype), not refused in the middle of an epoch."""
    from toydata import ToyVideo

    from deepstrf import StreamingNeuralDataset

    f64, f32 = ToyVideo(0, S=2), ToyVideo(1, S=2)
    f64.stims = [x.double() for x in f64.stims]
    pool = concat_neural_datasets([f64, f32], names=["f64", "f32"])
    for fmt in ("compact", "dense"):
        [batch] = list(StreamingNeuralDataset(pool, batch_size=4, shuffle=False, collate=fmt))
        assert batch["stims"].dtype == torch.float64
        assert torch.equal(batch["stims"][2, ..., :pool[2]["stims"].shape[-1]], pool[2]["stims"].double())

def test_stimuli_of_two_channel_counts_are_refused_alike_in_memory_and_streamed(tmp_path):
    """A source of RGB and grayscale frames (refused by validate now, so built past it): streamed
    batches broadcast the gray frames into 3 channels, or failed with a bare NumPy error."""
    from toydata import ToyVideo

    from deepstrf import StreamingNeuralDataset
    from deepstrf.datasets.neural_dataset import DatasetValidationError

    v = ToyVideo(0, S=2)
    v.stims[0] = v.stims[0].expand(3, *v.stims[0].shape[1:]).clone()
    with pytest.raises(DatasetValidationError, match=r"stims\[1\] has C=1 channels, stims\[0\] C=3"):
        v.validate()
    items = [v[0], v[1]]
    shapes = r"item 1 \(uid 'v0-s1'\) has stimuli of shape \(1, 6, 5, T\), its item 0 \(uid 'v0-s0'\) \(3, 6, 5, T\)"
    for collate in (neural_collate, compact_collate):
        with pytest.raises(ValueError, match=shapes):
            collate(items)
    v.validate = lambda **kw: None  # as a source saved before validate refused it
    for fmt in ("compact", "dense"):
        with pytest.raises(ValueError, match=shapes):
            next(iter(StreamingNeuralDataset(v, batch_size=2, shuffle=False, collate=fmt)))
