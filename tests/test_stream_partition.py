"""Pure sharding and shuffling functions: exactly-once, equal batches, resumption arithmetic."""

import itertools

import numpy as np
import pytest

from deepstrf.stream import partition, shuffle


def _steps(n, offset, world, batch, drop_last=False):
    per_rank = [partition.rank_batches(n, offset, world, r, batch, drop_last) for r in range(world)]
    return per_rank


@pytest.mark.parametrize("n,world,batch", list(itertools.product([0, 1, 5, 12, 17], [1, 2, 3], [1, 4])))
def test_exactly_once_and_equal_batches(n, world, batch):
    per_rank = _steps(n, 0, world, batch)
    assert len({len(b) for b in per_rank}) == 1  # same number of batches on every rank
    for step in zip(*per_rank):
        assert len({len(b) for b in step}) == 1  # and the same batch sizes at every step
    seen = np.concatenate([np.concatenate(b) for b in per_rank if b] or [np.zeros(0, int)])
    assert set(seen.tolist()) == set(range(n))
    assert len(seen) - n == (-n) % world  # padding repeats at most world - 1 units
    if n % world == 0:
        assert sorted(seen.tolist()) == list(range(n))  # exactly once when divisible


@pytest.mark.parametrize("n,world,batch", [(17, 3, 4), (12, 2, 4), (5, 3, 1)])
def test_drop_last_never_repeats(n, world, batch):
    per_rank = _steps(n, 0, world, batch, drop_last=True)
    seen = np.concatenate([np.concatenate(b) for b in per_rank if b]).tolist()
    assert len(seen) == len(set(seen)) == n - n % world


def test_steps_consume_a_prefix():
    n, world, batch = 23, 3, 4
    per_rank = _steps(n, 0, world, batch)
    for k in range(len(per_rank[0]) + 1):
        done = np.concatenate([b for r in per_rank for b in r[:k]] or [np.zeros(0, int)])
        consumed = partition.consumed_after(n, 0, world, batch, k)
        assert set(done.tolist()) == set(range(consumed))


@pytest.mark.parametrize("world2,batch2", [(1, 4), (2, 3), (3, 1)])
def test_resume_with_other_world_size_is_exact(world2, batch2):
    n, world, batch, k = 30, 3, 4, 2
    first = np.concatenate([b for r in _steps(n, 0, world, batch) for b in r[:k]])
    offset = partition.consumed_after(n, 0, world, batch, k)
    rest = np.concatenate([np.concatenate(r) for r in _steps(n, offset, world2, batch2)])
    combined = np.concatenate([first, rest]).tolist()
    assert set(combined) == set(range(n))
    assert len(combined) - n == (-(n - offset)) % world2


def test_workers_round_robin():
    batches = partition.rank_batches(20, 0, 1, 0, 3)
    got = [partition.worker_batches(batches, w, 3) for w in range(3)]
    steps = sorted(j for g in got for j, _ in g)
    assert steps == list(range(len(batches)))
    assert [j for j, _ in got[1]] == [1, 4]


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        partition.rank_batches(10, 0, 2, 2, 1)
    with pytest.raises(ValueError, match="offset"):
        partition.rank_batches(10, 11, 1, 0, 1)
    with pytest.raises(ValueError, match="worker_id"):
        partition.worker_batches([], 3, 2)


def test_block_shuffle_is_a_deterministic_permutation():
    a = shuffle.block_shuffle(100, seed=1, epoch=0, block_size=8, buffer_size=32)
    assert sorted(a.tolist()) == list(range(100))
    assert np.array_equal(a, shuffle.block_shuffle(100, seed=1, epoch=0, block_size=8, buffer_size=32))
    assert not np.array_equal(a, shuffle.block_shuffle(100, seed=1, epoch=1, block_size=8, buffer_size=32))
    assert not np.array_equal(a, shuffle.block_shuffle(100, seed=2, epoch=0, block_size=8, buffer_size=32))
    assert not np.array_equal(a, np.arange(100))


def test_block_shuffle_keeps_reads_local():
    # with a window of one block, each window is one run of consecutive items
    order = shuffle.block_shuffle(64, seed=0, epoch=0, block_size=8, buffer_size=8)
    for lo in range(0, 64, 8):
        window = np.sort(order[lo:lo + 8])
        assert np.array_equal(window, np.arange(window[0], window[0] + 8))


def test_homogeneous_batches_stay_within_groups():
    groups = [list(range(0, 7)), list(range(7, 20))]
    batches = shuffle.homogeneous_batches(groups, 4, shuffle=True, seed=0, epoch=0)
    assert sorted(np.concatenate(batches).tolist()) == list(range(20))
    for b in batches:
        assert (b < 7).all() or (b >= 7).all()
    assert len(batches) == 2 + 4


@pytest.mark.parametrize("world", [2, 3, 5])
def test_homogeneous_batches_partition_by_whole_batches_across_ranks(world):
    """source_homogeneous=True: the units split between ranks are whole batches (docs/streaming.md):
    every rank gets as many batches, every item is read, and at most world - 1 batches repeat."""
    from collections import Counter

    from deepstrf.stream import StreamingNeuralDataset
    from stream_helpers import small_pool

    pool = small_pool()
    per_rank = [list(StreamingNeuralDataset(pool, batch_size=4, seed=9, rank=r, world_size=world,
                                            source_homogeneous=True)) for r in range(world)]
    assert len({len(batches) for batches in per_rank}) == 1
    seen = Counter(m["uid"] for batches in per_rank for b in batches for m in b["stim_meta"])
    assert len(seen) == len(pool)
    batches = -(-pool.responses.sources[0].get_S() // 4) + -(-pool.responses.sources[1].get_S() // 4)
    assert len(per_rank) * len(per_rank[0]) - batches <= world - 1
