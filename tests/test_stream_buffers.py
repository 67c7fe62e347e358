"""Reused batch buffers: a buffer comes back only once nothing refers to the batch that used it,
in the process that built it and across DataLoader worker processes."""

import gc
import multiprocessing
import os

import numpy as np
import torch
import torch.multiprocessing  # noqa: F401  (registers the shared-memory reductions of tensors)
import pytest
from multiprocessing.reduction import ForkingPickler
from torch.utils.data import DataLoader

from deepstrf.stream import StreamingNeuralDataset, buffers
from deepstrf.stream.buffers import BufferPool

from stream_helpers import LOADER_TIMEOUT_S, compact_equal, crossed_without_copy, write_pool

MB = 1 << 20


@pytest.fixture(scope="module")
def local_pool(tmp_path_factory):
    return write_pool(str(tmp_path_factory.mktemp("stores")))


@pytest.fixture
def pool_everything(monkeypatch):
    """Pool buffers of any size (the test data's batches are small); forked workers inherit it."""
    monkeypatch.setattr(buffers, "MIN_POOLED_BYTES", 0)


def test_a_buffer_is_reused_only_once_every_view_of_it_is_gone(pool_everything):
    pool = BufferPool(shared=False, slots=2)
    a = pool.alloc((2 * MB,), np.uint8)
    first = a.data_ptr()
    b = pool.alloc((MB,), np.float32)
    assert b.data_ptr() != first and b.shape == (MB,)
    view, array = a[10:], None
    del a
    held = pool.alloc((2 * MB,), np.uint8)  # the view keeps a's buffer: another one (the third: fresh)
    assert held.data_ptr() != first and pool.reuses == 0
    array = view.numpy()
    del view, held
    assert pool.alloc((2 * MB,), np.uint8).data_ptr() != first  # a numpy view keeps it too
    del array
    again = pool.alloc((MB, 2), np.int8)  # now free: handed out again, in any shape and dtype that fits
    assert again.data_ptr() == first and again.shape == (MB, 2) and pool.reuses == 1


def test_a_full_pool_grows_a_free_buffer_or_falls_back_to_fresh_memory(pool_everything):
    pool = BufferPool(shared=False, slots=1)
    small = pool.alloc((2 * MB,), np.uint8)
    assert pool.slots[0].buffer.numel() >= 2 * MB
    other = pool.alloc((2 * MB,), np.uint8)  # the only slot is taken: fresh memory, not pooled
    assert len(pool.slots) == 1 and other.data_ptr() != small.data_ptr()
    del small
    big = pool.alloc((5 * MB,), np.uint8)  # the free slot is too small: replaced by a larger one
    assert len(pool.slots) == 1 and pool.slots[0].buffer.numel() >= 5 * MB
    assert big.data_ptr() == pool.slots[0].buffer.data_ptr()


def test_new_buffers_are_made_for_the_largest_batch_so_far(pool_everything):
    """Batches vary in size: a buffer made for a small one would soon be replaced by a larger one
    (memory mapped and zeroed again)."""
    pool = BufferPool(shared=False, slots=3)
    large = pool.alloc((4 * MB,), np.uint8)
    small = pool.alloc((MB,), np.uint8)  # the large one is held: a new slot, sized for 4 MB anyway
    assert pool.slots[1].buffer.numel() >= 4 * MB
    del large
    again = pool.alloc((4 * MB,), np.uint8)
    assert len(pool.slots) == 2 and small.data_ptr() != again.data_ptr()


def test_small_arrays_and_a_pool_without_slots_are_never_pooled():
    pool = BufferPool(shared=False)
    pool.alloc((buffers.MIN_POOLED_BYTES // 8 - 1,), np.int64)
    assert not pool.slots
    off = BufferPool(shared=False, slots=0)
    off.alloc((buffers.MIN_POOLED_BYTES,), np.uint8)
    assert not off.slots


def _reference(url):
    ds = StreamingNeuralDataset(url, batch_size=2, shuffle=True, seed=3, reuse_buffers=False)
    return list(ds)


def test_in_process_batches_reuse_buffers_and_kept_batches_stay_intact(local_pool, pool_everything):
    expected = _reference(local_pool)
    ds = StreamingNeuralDataset(local_pool, batch_size=2, shuffle=True, seed=3, prefetch=1, read_threads=1)
    seen = set()
    for batch, ref in zip(ds, expected):
        assert compact_equal(batch, ref)
        seen.add(batch.values.data_ptr())
    assert len(seen) < len(expected)  # dropped batches' buffers came back
    ds.set_epoch(0)
    kept = list(ds)
    assert len({b.values.data_ptr() for b in kept}) == len(kept)
    assert all(compact_equal(b, r) for b, r in zip(kept, expected, strict=True))


def test_worker_buffers_come_back_from_the_main_process(local_pool, pool_everything):
    """Real worker processes: the main process's finalizer returns each buffer once its batch
    is dropped, and batches that are kept (list(loader)) are never overwritten."""
    expected = sorted(_reference(local_pool), key=lambda b: b.stim_meta[0]["uid"])
    ds = StreamingNeuralDataset(local_pool, batch_size=2, shuffle=True, seed=3)
    generations = []
    for batch in DataLoader(ds, batch_size=None, num_workers=2, timeout=LOADER_TIMEOUT_S):
        assert crossed_without_copy(batch, batch.values)
        assert all(lease.state == "watching" for lease in batch._leases)
        generations += [lease.generation for lease in batch._leases]
        assert any(compact_equal(batch, ref) for ref in expected)
    assert max(generations) > 1  # some buffer served a second batch
    kept = sorted(DataLoader(ds, batch_size=None, num_workers=2, timeout=LOADER_TIMEOUT_S),
                  key=lambda b: b.stim_meta[0]["uid"])
    assert all(compact_equal(b, r) for b, r in zip(kept, expected, strict=True))
    assert max(lease.generation for b in kept for lease in b._leases) == 1  # nothing was dropped: no reuse
    assert sum(len(b._leases) for b in kept) == 2 * buffers.DEFAULT_SLOTS  # each worker's pool, then fresh memory


def test_persistent_workers_reuse_their_buffers_in_later_epochs(local_pool, pool_everything):
    """A worker keeps its pool for its life: the second epoch's batches are built in the buffers
    of the first (their generations go on), not in shared memory mapped again."""
    expected = list(StreamingNeuralDataset(local_pool, batch_size=2, shuffle=False, reuse_buffers=False))
    ds = StreamingNeuralDataset(local_pool, batch_size=2, shuffle=False)
    loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True, timeout=LOADER_TIMEOUT_S)
    first = [max((lease.generation for lease in b._leases), default=0) for b in loader]
    ds.set_epoch(1)
    later = []
    for batch in loader:
        later.append(min((lease.generation for lease in batch._leases), default=0))
        assert compact_equal(batch, expected[len(later) - 1])
    assert len(later) == len(first) == len(expected)
    assert min(later[:2]) > 1  # each worker's first batch of the epoch: a buffer used before


def test_a_batch_sent_on_to_another_process_is_a_copy_and_its_buffers_come_back(local_pool, pool_everything):
    """Forwarded from the main process, a worker's batch travels by value: the copy
    needs no lease, and the main process still gives the worker its buffer back."""
    ds = StreamingNeuralDataset(local_pool, batch_size=2, shuffle=False)
    batch = next(iter(DataLoader(ds, batch_size=None, num_workers=1, timeout=LOADER_TIMEOUT_S)))
    lease = batch._leases[0]
    released, slot, generation = lease.released, lease.slot, lease.generation
    at = {k: getattr(batch, k).untyped_storage().data_ptr() for k in ("values", "stims")}
    forwarded = ForkingPickler.loads(ForkingPickler.dumps(batch))
    assert all(lease.state == "inert" for lease in forwarded._leases)
    assert compact_equal(forwarded, batch)
    for k, ptr in at.items():  # the main process's batch stays put, the copy has memory of its own
        assert getattr(batch, k).untyped_storage().data_ptr() == ptr
        assert getattr(forwarded, k).untyped_storage().data_ptr() != ptr
    assert lease._finalizer.alive and int(released[slot]) != generation
    del batch, lease
    gc.collect()
    assert int(released[slot]) == generation  # the worker may build its next batch in the buffer


def _sum_values(inbox, outbox) -> None:
    batch = inbox.get(timeout=60)
    outbox.put(int(batch.values.to(torch.int64).sum()))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_a_batch_forwarded_through_a_queue_reaches_another_process(local_pool, pool_everything):
    """A real third process receives a worker's batch the main process puts on a multiprocessing queue."""
    ds = StreamingNeuralDataset(local_pool, batch_size=2, shuffle=False)
    batch = next(iter(DataLoader(ds, batch_size=None, num_workers=1, timeout=LOADER_TIMEOUT_S)))
    assert batch._leases
    context = multiprocessing.get_context("fork")
    inbox, outbox = context.Queue(), context.Queue()
    child = context.Process(target=_sum_values, args=(inbox, outbox))
    child.start()
    inbox.put(batch)
    assert outbox.get(timeout=60) == int(batch.values.to(torch.int64).sum())
    child.join(timeout=60)
    assert child.exitcode == 0


def test_reuse_can_be_turned_off(local_pool, pool_everything):
    ds = StreamingNeuralDataset(local_pool, batch_size=2, shuffle=False, reuse_buffers=False)
    assert next(iter(DataLoader(ds, batch_size=None, num_workers=1, timeout=LOADER_TIMEOUT_S)))._leases == []
    assert ds._buffer_pool(shared=False).max_slots == 0 and ds._buffer_pool(shared=True).max_slots == 0


def test_shared_buffers_are_memory_files_sent_by_descriptor():
    """A shared buffer is an anonymous memory file on Linux (not bounded by /dev/shm), mapped as it is
    filled, and crosses to another process by descriptor with what was written."""
    storage = buffers.shared_storage((12 << 20) + 12345)
    assert storage.is_shared()
    if hasattr(os, "memfd_create"):
        fd, _ = storage._share_fd_cpu_()
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:deepstrf-batch")
    t = torch.empty(0, dtype=torch.uint8).set_(storage)
    t[::4096] = 7
    assert int(t[::4096].min()) == 7 and int(t.sum()) == 7 * len(t[::4096])
    received = ForkingPickler.loads(ForkingPickler.dumps(t))  # sent by descriptor, as torch's own segments
    assert received.is_shared() and torch.equal(received, t)
