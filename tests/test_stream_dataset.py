"""StreamingNeuralDataset over in-memory and lazily concatenated datasets."""

from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from deepstrf.datasets.collate import CompactBatch, compact_collate, neural_collate
from deepstrf.stream import StreamingNeuralDataset

from stream_helpers import (LOADER_TIMEOUT_S, batch_keys, compact_equal, item_key, items_equal, loader_timeout,
                            small_pool, tensors_equal)
from toydata import ToyAudio


@pytest.fixture(scope="module")
def pool():
    return small_pool()


def test_items_equal_map_style_items(pool):
    stream = StreamingNeuralDataset(pool, shuffle=False)
    got = list(stream)
    assert len(got) == len(pool)
    for i, item in enumerate(got):
        assert items_equal(item, pool[i])


def test_items_of_plain_list_dataset_with_selection():
    ds = ToyAudio(seed=3, S=6, N=5)
    stream = StreamingNeuralDataset(ds, shuffle=False, neurons=[4, 1, 2], stims=[0, 2, 3, 5])
    ds.select_population([4, 1, 2])
    ds.select_stims([0, 2, 3, 5])
    got = list(stream)
    assert len(got) == len(ds)
    for i, item in enumerate(got):
        assert items_equal(item, ds[i])


def test_selection_callable_and_visibility_rule(pool):
    stream = StreamingNeuralDataset(pool, shuffle=True, select=lambda d: d.select_pop_by_nrn_attr("dataset", "AA1"))
    got = list(stream)
    ref = small_pool()
    ref.select_pop_by_nrn_attr("dataset", "AA1")
    assert sorted(map(item_key, got)) == sorted(item_key(ref[i]) for i in range(len(ref)))
    assert all(m["dataset"] == "AA1" for it in got for m in [it["stim_meta"]])
    assert all(len(it["responses"]) == len(ref.selected_neurons()) for it in got)
    assert pool.I == []  # the caller's dataset is not modified


@pytest.mark.parametrize("batch_size", [1, 4])
def test_compact_batches_equal_compact_collate(pool, batch_size):
    stream = StreamingNeuralDataset(pool, shuffle=False, batch_size=batch_size, collate="compact")
    batches = list(stream)
    assert all(isinstance(b, CompactBatch) for b in batches)
    assert batches[0].values.dtype == torch.float32  # in-memory float counts stay as they were
    for j, b in enumerate(batches):
        items = [pool[i] for i in range(j * batch_size, min(len(pool), (j + 1) * batch_size))]
        assert compact_equal(b, compact_collate(items, neuron_index=pool.selected_neurons()))


def test_integer_counts_stay_integer():
    ds = ToyAudio(seed=1, S=4, N=3)
    ds.responses = [[r if r.shape == (1, 1) else r.to(torch.uint8) for r in row] for row in ds.responses]
    ds._invalidate_nrn_masks()
    batch = next(iter(StreamingNeuralDataset(ds, shuffle=False, batch_size=2)))
    assert batch.values.dtype == torch.uint8


def test_dense_batches_equal_neural_collate(pool):
    stream = StreamingNeuralDataset(pool, shuffle=False, batch_size=5, collate="dense",
                                    neurons=list(range(5, 30)))
    pool2 = small_pool()
    pool2.select_population(list(range(5, 30)))
    for j, b in enumerate(stream):
        ref = neural_collate([pool2[i] for i in range(j * 5, min(len(pool2), (j + 1) * 5))])
        for k in ("stims", "responses", "valid_mask"):
            assert tensors_equal(b[k], ref[k]) and b[k].dtype == ref[k].dtype
        assert b["stim_meta"] == ref["stim_meta"]


def test_deterministic_per_seed_and_reshuffled_per_epoch(pool):
    def order(seed, epoch):
        s = StreamingNeuralDataset(pool, seed=seed, batch_size=3)
        s.set_epoch(epoch)
        return [k for b in s for k in batch_keys(b)]

    a = order(0, 0)
    assert a == order(0, 0)
    assert sorted(a) == sorted(order(0, 1)) and a != order(0, 1)
    assert a != order(1, 0)
    assert a != sorted(a)


def test_full_pass_advances_epoch(pool):
    s = StreamingNeuralDataset(pool, batch_size=4)
    first = [k for b in s for k in batch_keys(b)]
    assert s.epoch == 1
    second = [k for b in s for k in batch_keys(b)]
    assert sorted(first) == sorted(second) and first != second


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_dataloader_workers_exactly_once(pool, workers):
    s = StreamingNeuralDataset(pool, batch_size=3, seed=5)
    loader = DataLoader(s, batch_size=None, num_workers=workers, timeout=loader_timeout(workers))
    keys = [k for b in loader for k in batch_keys(b)]
    assert Counter(keys) == Counter(item_key(pool[i]) for i in range(len(pool)))
    assert len(keys) == len(pool)
    # same order whatever the number of workers
    s.set_epoch(0)
    assert keys == [k for b in s for k in batch_keys(b)]


def test_persistent_workers_follow_epochs_and_resumption(pool):
    """Persistent workers keep their copy of the dataset between epochs; the epoch and the resume
    offset they read are shared with the main process."""
    def order(epoch):
        ref = StreamingNeuralDataset(pool, batch_size=2, seed=4)
        ref.set_epoch(epoch)
        return [k for b in ref for k in batch_keys(b)]

    s = StreamingNeuralDataset(pool, batch_size=2, seed=4)
    loader = s.loader(num_workers=2, persistent_workers=True)
    assert [k for b in loader for k in batch_keys(b)] == order(0)
    assert s.epoch == 1  # a full pass through loader() advances the epoch, in the workers too
    assert [k for b in loader for k in batch_keys(b)] == order(1)
    s.set_epoch(5)
    seen = []
    for i, b in enumerate(loader):
        seen += batch_keys(b)
        if i == 1:
            break
    s.load_state_dict(s.state_dict())  # resume where the interrupted pass stopped, same workers
    assert seen + [k for b in loader for k in batch_keys(b)] == order(5)


def test_items_with_dataloader_batching(pool):
    s = StreamingNeuralDataset(pool, seed=2)
    loader = DataLoader(s, batch_size=4, collate_fn=neural_collate, num_workers=2, timeout=LOADER_TIMEOUT_S)
    keys = [m["uid"] for b in loader for m in b["stim_meta"]]
    assert sorted(keys) == sorted(item_key(pool[i]) for i in range(len(pool)))


def test_duplicate_neurons_are_refused(pool):
    """A batch identifies cells by neuron id: a neuron selected twice would fill one position only."""
    with pytest.raises(ValueError, match=r"neurons= .*names neurons \[3\] more than once.*select each neuron once"):
        StreamingNeuralDataset(pool, batch_size=2, neurons=[3, 3, 12])
    by_select = StreamingNeuralDataset(pool, batch_size=2, select=lambda d: d.select_population([12, 3, 12]))
    with pytest.raises(ValueError, match=r"neuron selection of .*names neurons \[12\] more than once"):
        next(iter(by_select))


@pytest.mark.parametrize("workers_before,workers_after", [(0, 2), (2, 1), (1, 0)])
def test_resume_mid_epoch_with_other_worker_count(pool, workers_before, workers_after):
    full = StreamingNeuralDataset(pool, batch_size=2, seed=9)
    full.set_epoch(3)
    expected = [k for b in full for k in batch_keys(b)]

    s = StreamingNeuralDataset(pool, batch_size=2, seed=9)
    s.set_epoch(3)
    seen = []
    for i, b in enumerate(s.loader(num_workers=workers_before)):
        seen += batch_keys(b)
        if i == 2:
            break
    state = s.state_dict()
    assert state["consumed"] == 6 and state["epoch"] == 3

    t = StreamingNeuralDataset(pool, batch_size=2, seed=9)
    t.load_state_dict(state)
    assert len(t) == -(-(len(pool) - 6) // 2)
    rest = [k for b in t.loader(num_workers=workers_after) for k in batch_keys(b)]
    assert seen + rest == expected
    assert t.epoch == 4 and t.state_dict()["consumed"] == 0


def test_resume_in_item_mode(pool):
    s = StreamingNeuralDataset(pool, seed=1)
    it = iter(s)
    first = [item_key(next(it)) for _ in range(5)]
    t = StreamingNeuralDataset(pool, seed=1)
    t.load_state_dict(s.state_dict())
    rest = [item_key(x) for x in t]
    assert sorted(first + rest) == sorted(item_key(pool[i]) for i in range(len(pool)))


def test_resume_refuses_other_selection(pool):
    s = StreamingNeuralDataset(pool, batch_size=2)
    state = s.state_dict()
    with pytest.raises(ValueError, match="selection"):
        StreamingNeuralDataset(pool, batch_size=2, stims=[0, 1, 2]).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        StreamingNeuralDataset(pool, batch_size=2, seed=4).load_state_dict(state)


@pytest.mark.parametrize("change", [dict(block_size=1), dict(shuffle_buffer=4)])
def test_resume_refuses_another_order(pool, change):
    """block_size and shuffle_buffer shape the epoch's order: resuming under other ones would repeat
    and skip items."""
    s = StreamingNeuralDataset(pool, batch_size=4, seed=0)
    next(iter(s))
    state = s.state_dict()
    (key, value), = change.items()
    with pytest.raises(ValueError, match=rf"state has {key}={getattr(s, key)}, this dataset {value}.*"
                                         rf"build the dataset with {key}={getattr(s, key)}"):
        StreamingNeuralDataset(pool, batch_size=4, seed=0, **change).load_state_dict(state)



def test_an_unshuffled_resume_takes_other_shuffle_settings_and_neurons_may_be_any_iterable(pool):
    """Without shuffling block_size and shuffle_buffer do not change the order: resuming under other
    ones continues the pass. neurons= may be a generator (it is read once)."""
    s = StreamingNeuralDataset(pool, batch_size=4, shuffle=False, neurons=(n for n in range(3)))
    first = next(iter(s))
    state = s.state_dict()
    t = StreamingNeuralDataset(pool, batch_size=4, shuffle=False, block_size=1, shuffle_buffer=4,
                               neurons=iter(range(3)))
    t.load_state_dict(state)
    rest = list(t)
    assert len(first["stim_meta"]) + sum(len(b["stim_meta"]) for b in rest) == len(s.dataset())

def test_resume_loads_a_state_saved_without_the_order_settings(pool):
    s = StreamingNeuralDataset(pool, batch_size=4, seed=0)
    next(iter(s))
    state = {k: v for k, v in s.state_dict().items() if k not in ("block_size", "shuffle_buffer")}
    t = StreamingNeuralDataset(pool, batch_size=4, seed=0)
    t.load_state_dict(state)
    assert t.state_dict()["consumed"] == 4


def test_source_homogeneous_batches(pool):
    s = StreamingNeuralDataset(pool, batch_size=4, source_homogeneous=True, seed=3)
    batches = list(s)
    for b in batches:
        assert len({m["dataset"] for m in b.stim_meta}) == 1
    assert sorted(k for b in batches for k in batch_keys(b)) == sorted(item_key(pool[i]) for i in range(len(pool)))


def test_ranks_given_explicitly(pool):
    n = len(pool)
    per_rank = [[batch_keys(b) for b in StreamingNeuralDataset(pool, batch_size=2, rank=r, world_size=3)]
                for r in range(3)]
    assert len({len(b) for b in per_rank}) == 1
    keys = [k for r in per_rank for b in r for k in b]
    assert set(keys) == {item_key(pool[i]) for i in range(n)}
    assert len(keys) == n + (-n) % 3


def test_stats_count_items_and_batches(pool):
    s = StreamingNeuralDataset(pool, batch_size=4)
    list(DataLoader(s, batch_size=None, num_workers=2, timeout=LOADER_TIMEOUT_S))
    st = s.stats(seconds=1.0)
    assert st["items"] == len(pool) and st["batches"] == -(-len(pool) // 4)
    assert st["bytes_used"] > 0 and st["requests"] >= st["batches"]


def test_bad_arguments(pool):
    with pytest.raises(TypeError, match="URL or a NeuralDataset"):
        StreamingNeuralDataset(42)
    with pytest.raises(ValueError, match="collate"):
        StreamingNeuralDataset(pool, collate="sparse")
    with pytest.raises(ValueError, match="batch_size"):
        StreamingNeuralDataset(pool, source_homogeneous=True)
    with pytest.raises(ValueError, match="rank"):
        StreamingNeuralDataset(pool, rank=0)


@pytest.mark.parametrize("collate", ["compact", "dense"])
def test_batches_from_workers_equal_in_process_batches(pool, collate):
    s = StreamingNeuralDataset(pool, batch_size=4, collate=collate, shuffle=False)
    here = list(s)
    there = list(DataLoader(s, batch_size=None, num_workers=2, timeout=LOADER_TIMEOUT_S))
    assert len(here) == len(there)
    for a, b in zip(here, there):
        for k in ("stims", "values", "offsets", "neuron_index") if collate == "compact" else \
                ("stims", "responses", "valid_mask"):
            assert tensors_equal(a[k], b[k]) and a[k].dtype == b[k].dtype


def test_subset_streams_some_stims_over_the_whole_neuron_axis(pool):
    stims = [0, 1, len(pool) - 1]
    s = StreamingNeuralDataset(pool, subset=stims, batch_size=3, collate="dense", shuffle=False)
    (batch,) = list(s)
    assert batch["responses"].shape[1] == pool.N_neurons  # stims= would hide neurons without data in them
    assert [m["uid"] for m in batch["stim_meta"]] == [item_key(pool[i]) for i in stims]
    with pytest.raises(IndexError, match="subset"):
        len(StreamingNeuralDataset(pool, subset=[10 ** 6]))  # a URL is checked at construction


@pytest.mark.parametrize("workers", [0, 2])
def test_a_subset_set_between_epochs_is_what_the_next_one_reads(pool, workers):
    s = StreamingNeuralDataset(pool, subset=range(6), batch_size=2, shuffle=False)
    loader = s.loader(num_workers=workers, timeout=loader_timeout(workers))
    assert len([k for b in loader for k in batch_keys(b)]) == 6
    s.subset = [len(pool) - 3, len(pool) - 2, len(pool) - 1]
    assert len(loader) == len(s) == 2  # batches
    assert [k for b in loader for k in batch_keys(b)] == [item_key(pool[i]) for i in s.subset]


@pytest.mark.parametrize("workers", [0, 2])
def test_the_epoch_after_a_resumed_one_is_whole_without_length_warnings(workers, tmp_path):
    """len(loader) after a resume is the rest of the epoch; torch kept that length and warned for
    every batch of the next, whole epoch beyond it."""
    import warnings

    from stream_helpers import write_pool

    pool = write_pool(str(tmp_path))  # a store URL: forked workers, every batch from them
    first = StreamingNeuralDataset(pool, batch_size=4, seed=7)
    passing = iter(first)
    next(passing), next(passing)
    state = first.state_dict()
    del passing
    resumed = StreamingNeuralDataset(pool, batch_size=4, seed=7)
    resumed.load_state_dict(state)
    loader = resumed.loader(num_workers=workers, timeout=loader_timeout(workers))
    assert len(loader) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert sum(1 for _ in loader) == 2
        assert sum(1 for _ in loader) == 4 == len(loader)
        # a resumed pass that hands out its last batch but is left before its end (a trainer that
        # stops after len(loader) batches) counts as whole: the next pass is a whole epoch
        resumed.load_state_dict(state)
        passing = iter(loader)
        for _ in range(len(loader)):
            next(passing)
        assert len(loader) == len(resumed) == 4 and resumed.epoch == 0
        assert sum(1 for _ in loader) == 4 and resumed.epoch == 2
