"""Memory stays bounded while streaming far more data than the prefetch budget."""

import gc

import numpy as np
import psutil
import torch

from deepstrf.datasets.neural_dataset import NeuralDataset
from deepstrf.datasets.views import LazySequence, RawRow, ResponseGrid
from deepstrf.stream import StreamingNeuralDataset

S, N, R, T = 200, 50, 10, 8000  # 4 MB of uint8 counts per stim, 800 MB per epoch


class _BigGrid(ResponseGrid):
    """Rows made on demand (cheaply), like a store whose rows are read and then dropped."""

    def __init__(self):
        super().__init__(S, N)

    def read_raw_rows(self, stims, neurons=None):
        ids = np.arange(N) if neurons is None else np.asarray(neurons)
        k = len(ids)
        return [RawRow(s, ids, np.full(k, R), np.full(k, T), np.full(k * R * T, s % 7, dtype=np.uint8))
                for s in stims]

    def _read_row(self, s, neurons):
        return [torch.from_numpy(c.astype(np.float32)) for c in self.read_raw_rows([s], neurons)[0].cells()]

    def _mask(self):
        return torch.ones((S, N), dtype=torch.bool)


class _Stims(LazySequence):
    def _get(self, i):
        return torch.zeros(1, 4, T)


class _BigDataset(NeuralDataset):
    def __init__(self):
        super().__init__(path="big://", dt_ms=1.0)
        self.stims = _Stims(S)
        self.responses = _BigGrid()
        self.stim_meta = [{"uid": s} for s in range(S)]
        self.nrn_meta = [{} for _ in range(N)]
        self.N_neurons = N


def test_memory_bounded_by_prefetch():
    stream = StreamingNeuralDataset(_BigDataset(), batch_size=4, prefetch=2, read_threads=2)
    proc = psutil.Process()
    gc.collect()
    base = proc.memory_info().rss
    peak, total = base, 0
    for batch in stream:
        total += batch.values.numel()
        peak = max(peak, proc.memory_info().rss)
    assert total == S * N * R * T
    assert stream.last_prefetcher.max_outstanding <= 2
    # (prefetch + 1 held + 1 being built) batches of 16 MB, plus allocator slack
    assert peak - base < 200 * 2**20, f"RSS grew by {(peak - base) / 2**20:.0f} MiB streaming 800 MB"
