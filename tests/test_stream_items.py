"""Items of StreamingNeuralDataset batched by a DataLoader: compact in transit, equal to the dataset's batches."""

import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from deepstrf.datasets.collate import CompactBatch, compact_collate, neural_collate
from deepstrf.stream import StreamingNeuralDataset
from deepstrf.stream.items import StreamItem
from deepstrf.stream.workers import worker_context

from stream_helpers import LOADER_TIMEOUT_S, crossed_without_copy, items_equal, small_pool, tensors_equal
from toydata import ToyAudio


@pytest.fixture(scope="module")
def pool():
    return small_pool()


def assert_same_batch(a, b) -> None:
    """Equal field by field, dtypes included."""
    keys = a.keys() if isinstance(a, CompactBatch) else ("stims", "responses", "valid_mask")
    for k in keys:
        if k != "stim_meta":
            assert tensors_equal(a[k], b[k]) and a[k].dtype == b[k].dtype, k
    assert a["stim_meta"] == b["stim_meta"]


@pytest.mark.parametrize("fmt,collate_fn", [("compact", compact_collate), ("dense", neural_collate)])
def test_itemwise_batches_equal_dataset_batches_with_workers(pool, fmt, collate_fn):
    built = StreamingNeuralDataset(pool, batch_size=4, collate=fmt, seed=3)
    built.set_epoch(1)
    expected = list(built.loader(num_workers=2, timeout=LOADER_TIMEOUT_S))
    items = StreamingNeuralDataset(pool, loader_batch_size=4, seed=3)
    items.set_epoch(1)
    got = list(DataLoader(items, batch_size=4, collate_fn=collate_fn, num_workers=2, timeout=LOADER_TIMEOUT_S,
                          multiprocessing_context=worker_context()))
    assert len(got) == len(expected) == -(-len(pool) // 4)
    for a, b in zip(got, expected):
        assert_same_batch(a, b)
    assert isinstance(got[0], CompactBatch if fmt == "compact" else dict)


def test_items_stay_compact_and_equal_map_style_items():
    ds = ToyAudio(seed=1, S=5, N=6)  # ragged repeats, missing pairs between valid ones
    got = list(StreamingNeuralDataset(ds, shuffle=False))
    assert all(isinstance(it, StreamItem) for it in got)
    for i, it in enumerate(got):
        assert items_equal(it, ds[i])
        assert tensors_equal(it["responses"][-1], ds[i]["responses"][-1])
        assert [r.shape for r in it["responses"][1:3]] == [r.shape for r in ds[i]["responses"][1:3]]
    with pytest.raises(IndexError, match="out of range"):
        got[0]["responses"][6]


def test_fast_collates_equal_generic_collates():
    ds = ToyAudio(seed=2, S=5, N=7)
    streamed = list(StreamingNeuralDataset(ds, shuffle=False))
    plain = [ds[i] for i in range(len(ds))]
    dense, reference = neural_collate(streamed), neural_collate(plain)
    for k in ("stims", "responses", "valid_mask"):
        assert tensors_equal(dense[k], reference[k]) and dense[k].dtype == reference[k].dtype
    assert torch.equal(dense["valid_mask"], ~dense["responses"].isnan())
    compact, reference = compact_collate(streamed), compact_collate(plain)
    for k in compact.keys():
        if k != "stim_meta":
            assert tensors_equal(compact[k], reference[k]), k
    remapped = compact_collate(streamed, neuron_index=[10 + n for n in range(7)])
    assert torch.equal(remapped.neuron_index, compact.neuron_index + 10)


def test_default_collate_says_which_collate_to_pass(pool):
    items = list(StreamingNeuralDataset(pool, shuffle=False))[:2]
    with pytest.raises(TypeError, match="collate_fn=compact_collate"):
        default_collate(items)
    with pytest.raises(TypeError, match="neural_collate"):
        next(iter(DataLoader(StreamingNeuralDataset(pool), batch_size=2, num_workers=0)))  # no worker, no timeout


def test_items_cross_to_the_main_process(pool):
    """A DataLoader with batch_size=None and a worker: items pickled whole, still equal to ds[i]."""
    s = StreamingNeuralDataset(pool, shuffle=False)
    got = list(DataLoader(s, batch_size=None, num_workers=1, timeout=LOADER_TIMEOUT_S,
                          multiprocessing_context=worker_context()))
    assert len(got) == len(pool)
    assert all(items_equal(it, pool[i]) for i, it in enumerate(got))


def test_loader_batch_size_resumes_by_batches(pool):
    s = StreamingNeuralDataset(pool, loader_batch_size=3, seed=5)
    assert len(s) == len(pool)
    it = iter(s)
    seen = [next(it)["stim_meta"]["uid"] for _ in range(4)]  # the second planned batch has begun
    state = s.state_dict()
    assert state["consumed"] == 6
    t = StreamingNeuralDataset(pool, loader_batch_size=3, seed=5)
    t.load_state_dict(state)
    rest = [x["stim_meta"]["uid"] for x in t]
    full = [x["stim_meta"]["uid"] for x in StreamingNeuralDataset(pool, loader_batch_size=3, seed=5)]
    assert seen[:3] + rest == full[:3] + full[6:]
    with pytest.raises(ValueError, match="loader_batch_size"):
        StreamingNeuralDataset(pool, batch_size=2, loader_batch_size=2)


@pytest.mark.parametrize("itemwise", [False, True])
def test_dense_buffers_from_workers_come_back(pool, monkeypatch, itemwise):
    """Dense batches built in a worker (by the dataset, or by neural_collate from items) live in reused
    shared memory: the batch carries the leases that give each buffer back once the main process drops it."""
    from deepstrf.stream import buffers

    monkeypatch.setattr(buffers, "MIN_POOLED_BYTES", 0)  # forked workers inherit it
    if itemwise:
        ds = StreamingNeuralDataset(pool, loader_batch_size=2, seed=1)
        loader = DataLoader(ds, batch_size=2, collate_fn=neural_collate, num_workers=1, timeout=LOADER_TIMEOUT_S)
    else:
        ds = StreamingNeuralDataset(pool, batch_size=2, collate="dense", seed=1)
        loader = DataLoader(ds, batch_size=None, num_workers=1, timeout=LOADER_TIMEOUT_S)
    generations = []
    for batch in loader:
        assert crossed_without_copy(batch, batch["responses"]) and crossed_without_copy(batch, batch["valid_mask"])
        assert torch.equal(batch["valid_mask"], ~batch["responses"].isnan())
        generations += [lease.generation for lease in batch._leases]
    assert max(generations) > 1
