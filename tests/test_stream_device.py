"""Batches delivered on a device: compact batches moved there, dense batches built there."""

from __future__ import annotations

import pytest
import torch
from stream_helpers import LOADER_TIMEOUT_S, small_pool, write_pool

from deepstrf.datasets.collate import CompactBatch
from deepstrf.stream import StreamingNeuralDataset

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


SELECTED = [0, 3, 5, 12, 40, 58, 2]  # both sources, out of stored order: missing pairs


@pytest.fixture(scope="module")
def pool():
    pool = small_pool()
    pool.select_population(SELECTED)
    return pool


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    return write_pool(str(tmp_path_factory.mktemp("device")))


def dense_equal(a: dict, b: dict) -> bool:
    return (a.keys() >= {"stims", "responses", "valid_mask", "stim_meta"}
            and torch.equal(a["stims"].cpu(), b["stims"].cpu())
            and a["responses"].dtype == b["responses"].dtype
            and torch.equal(a["responses"].cpu().nan_to_num(-1), b["responses"].cpu().nan_to_num(-1))
            and torch.equal(a["valid_mask"].cpu(), b["valid_mask"].cpu()) and a["stim_meta"] == b["stim_meta"])


def host_dense(source) -> list[dict]:
    return list(StreamingNeuralDataset(source, batch_size=4, collate="dense", seed=5, neurons=SELECTED))


@pytest.mark.parametrize("workers, start", [(0, None), (2, "fork"), (2, "forkserver")])
def test_dense_built_on_the_device_equals_the_host_dense_batches(url, workers, start):
    """The workers send compact batches; the consumer's process builds the dense ones (here on the
    CPU: the same code that runs on a GPU), the main process's own first batches too (forkserver
    workers take seconds to start: the main process reads the first batches meanwhile)."""
    ds = StreamingNeuralDataset(url, batch_size=4, collate="dense", seed=5, device="cpu", neurons=SELECTED)
    assert ds.built_format == "compact"
    options = {"timeout": LOADER_TIMEOUT_S, "multiprocessing_context": start} if workers else {}
    loader = ds.loader(num_workers=workers, **options)
    assert loader.read_while_starting  # compact batches cross: the main process may read while workers start
    got = list(loader)
    expected = host_dense(url)
    assert len(got) == len(expected) > 2
    assert all(isinstance(b, dict) and dense_equal(b, e) for b, e in zip(got, expected))
    assert ds.epoch == 1  # a complete pass still advances the epoch
    assert (loader.lead_batches > 0) == (start == "forkserver")


def test_compact_batches_on_a_device_and_in_process_iteration(pool):
    ds = StreamingNeuralDataset(pool, batch_size=4, seed=5, device="cpu")
    batches = list(ds)
    assert all(isinstance(b, CompactBatch) for b in batches)
    dense = [b.to_dense(ds.selected_neurons()) for b in batches]  # as docs/streaming.md writes it
    assert ds.selected_neurons() == pool.selected_neurons() == SELECTED
    assert all(dense_equal(d, e) for d, e in zip(dense, host_dense(pool)))


def test_a_device_needs_dataset_built_batches(pool):
    with pytest.raises(ValueError, match="needs batch_size.*to_dense"):
        StreamingNeuralDataset(pool, device="cpu")


def test_pinning_dense_host_batches_is_warned_against(pool):
    ds = StreamingNeuralDataset(pool, batch_size=4, collate="dense")
    with pytest.warns(UserWarning, match="device='cuda'"):
        ds.loader(pin_memory=True)
    assert StreamingNeuralDataset(pool, batch_size=4, device="cpu").loader(num_workers=0).pin_memory is False


@needs_cuda
@pytest.mark.parametrize("collate", ["compact", "dense"])
def test_batches_on_cuda_equal_the_host_ones(url, collate):
    ds = StreamingNeuralDataset(url, batch_size=4, collate=collate, seed=5, device="cuda", neurons=SELECTED)
    loader = ds.loader(num_workers=2, timeout=LOADER_TIMEOUT_S)
    assert loader.pin_memory  # compact batches only cross from the workers: pinned by default
    assert loader.persistent_workers  # forking a process that holds a CUDA context is slow
    got = list(loader)
    for b, e in zip(got, host_dense(url)):
        if collate == "compact":
            assert b.values.is_cuda
            b = b.to_dense(SELECTED)
        assert b["responses"].is_cuda and dense_equal(b, e)
    assert len(list(loader)) == len(got)  # the persistent workers' second pass
