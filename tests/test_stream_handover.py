"""How a worker's batch tensors reach the main process: a pooled buffer's descriptor once, then its
name; small arrays inside the pickle; torch's way for everything else."""

import gc
import multiprocessing
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from multiprocessing.reduction import ForkingPickler

from deepstrf.stream import StreamingNeuralDataset, buffers, handover

from stream_helpers import LOADER_TIMEOUT_S, compact_equal, write_pool


@pytest.fixture(scope="module")
def local_pool(tmp_path_factory):
    return write_pool(str(tmp_path_factory.mktemp("stores")))


def test_a_named_buffer_crosses_by_name_and_is_mapped_once():
    buffer = torch.UntypedStorage._new_shared(4096)
    tensor = torch.empty(0, dtype=torch.uint8).set_(buffer)
    handover.send_by_reference(buffer, "test:0")
    first = ForkingPickler.dumps(tensor)
    second = ForkingPickler.dumps(tensor[100:200])
    assert b"DupFd" in bytes(first) and b"DupFd" not in bytes(second)  # the descriptor goes once
    received, view = ForkingPickler.loads(first), ForkingPickler.loads(second)
    tensor[150] = 7  # the same shared memory
    assert received[150] == 7 and view[50] == 7
    # mapped once: a later batch reads pages the consumer already faulted in, through a storage of its own
    assert view.untyped_storage().data_ptr() == received.untyped_storage().data_ptr()
    assert view.untyped_storage() is not received.untyped_storage()
    assert handover.kept_descriptors() >= 1


def _exit_with_byte(tensor: torch.Tensor, index: int) -> None:
    os._exit(int(tensor[index]))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_a_forked_child_reads_a_received_batch():
    """A process the user forks while holding a worker's batch reads it (the kept mapping is inherited)."""
    buffer = torch.UntypedStorage._new_shared(4096)
    tensor = torch.empty(0, dtype=torch.uint8).set_(buffer)
    handover.send_by_reference(buffer, "test:forked-reader")
    received = ForkingPickler.loads(ForkingPickler.dumps(tensor))
    tensor[150] = 7
    child = multiprocessing.get_context("fork").Process(target=_exit_with_byte, args=(received, 150))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 7


def test_a_received_tensor_sent_on_travels_by_value():
    """The main process's storage over a worker's buffer is sent on by value: the copy does not change
    when the worker reuses the buffer, and the main process's tensor still reads the buffer."""
    buffer = torch.UntypedStorage._new_shared(4096)
    tensor = torch.empty(0, dtype=torch.uint8).set_(buffer)
    tensor[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    handover.send_by_reference(buffer, "test:sent-on")
    received = ForkingPickler.loads(ForkingPickler.dumps(tensor))
    at = received.untyped_storage().data_ptr()
    sent_on = ForkingPickler.loads(ForkingPickler.dumps(received[:4]))
    assert not received.is_shared() and not sent_on.is_shared()
    tensor[:4] = 9  # the worker builds its next batch in the buffer
    assert sent_on.tolist() == [1, 2, 3, 4]
    assert received.untyped_storage().data_ptr() == at and received[:4].tolist() == [9, 9, 9, 9]


def test_a_name_never_received_is_refused_with_the_fix():
    with pytest.raises(RuntimeError, match=r"never received.*reuse_buffers=False"):
        handover._rebuild_named(os.getpid(), "test:never-sent", 0)


def test_small_arrays_travel_by_value():
    small = torch.arange(10, dtype=torch.int64)
    handover.send_by_value(small.untyped_storage())
    received = ForkingPickler.loads(ForkingPickler.dumps(small))
    assert torch.equal(received, small) and not received.is_shared()
    other = torch.arange(10)  # not marked: torch's way, into shared memory
    assert ForkingPickler.loads(ForkingPickler.dumps(other)).is_shared()


def test_descriptors_of_exited_workers_are_closed(tmp_path):
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = int(child.stdout)
    r, w = os.pipe()
    os.close(w)
    handover._KEPT[(gone, "test:0")] = handover._Kept(r, 1, 0)
    assert handover.forget_exited() >= 1 and (gone, "test:0") not in handover._KEPT
    with pytest.raises(OSError):
        os.fstat(r)  # closed


def test_worker_batches_cross_without_a_descriptor_round_trip_each(local_pool, monkeypatch):
    """Real workers over two passes: batches are right, the consumer fetches a descriptor per buffer
    (not per tensor per batch), and none is kept once the pass's workers have exited."""
    monkeypatch.setattr(buffers, "MIN_POOLED_BYTES", 0)  # the test data's batches are small: pool them (forked workers inherit it)
    gc.collect()  # the kept workers of earlier tests' loaders exit with them: their descriptors go too
    handover.forget_exited()
    before, kept_before = dict(handover.RECEIVED), handover.kept_descriptors()
    ds = StreamingNeuralDataset(local_pool, batch_size=1, shuffle=False)
    expected = list(StreamingNeuralDataset(local_pool, batch_size=1, shuffle=False, reuse_buffers=False))
    for _ in range(2):
        seen = 0
        for batch in ds.loader(num_workers=2, timeout=LOADER_TIMEOUT_S, multiprocessing_context="fork",
                               persistent_workers=False):
            assert compact_equal(batch, expected[seen])  # dropped at once: its buffers come back
            assert handover.kept_descriptors() > kept_before
            seen += 1
        assert seen == len(expected)
        assert handover.kept_descriptors() == kept_before  # the workers exited with the pass
    fetched = handover.RECEIVED["descriptors"] - before["descriptors"]
    pushed = handover.RECEIVED["pushed"] - before["pushed"]
    by_name = handover.RECEIVED["by_name"] - before["by_name"]
    # per pass and worker, each buffer of its pool and its released-array once, pushed by the forked
    # worker (none fetched from it); the rest by name
    assert fetched == 0
    assert 0 < pushed <= 2 * 2 * (2 * buffers.slots_for("compact") + 1)
    assert by_name > pushed


def test_medium_buffers_are_pooled_apart_and_share_the_released_array():
    """A batch's stimuli (between the by-value and the large sizes) are reused from a pool of their
    own, so they cross by name too without taking a large slot; both pools share one released-array
    (one descriptor for it)."""
    pool = buffers.BufferPool(shared=True, slots=2)
    big = pool.alloc((buffers.MIN_POOLED_BYTES,), np.uint8)
    medium = pool.alloc((buffers.BY_VALUE_BYTES,), np.uint8)
    small = pool.alloc((16,), np.int64)
    assert big.is_shared() and medium.is_shared() and handover.sent_by_value(small.untyped_storage())
    assert len(pool.slots) == 1 and len(pool._medium.slots) == 1
    leases = pool.leases([big, medium, small])
    assert len(leases) == 2
    assert len({lease.released.untyped_storage().data_ptr() for lease in leases}) == 1
    assert {lease.released.storage_offset() for lease in leases} == {0, 2}
