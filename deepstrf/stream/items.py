"""Items of a ``StreamingNeuralDataset`` without ``batch_size``: compact, and fast to batch.

An item equals map-style ``ds[i]`` (a dict with ``stims``, ``responses``,
``valid_mask``, ``stim_meta``), but its ``responses`` is a
:class:`CompactResponses`: the item's stored row (valid cells only, counts in
their stored dtype), which produces each neuron's float tensor, or the missing
sentinel, only when asked. No per-cell tensor is made while items travel.

``neural_collate`` and ``compact_collate`` batch such items straight from
their rows with the code that builds the dataset's own batches (so the
batches are equal), in shared memory reused across batches when they run in
a DataLoader worker: nothing is copied again on the way to the main process.
torch's ``default_collate`` cannot stack ragged responses; for these items it
raises an error that says which collate to pass instead.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info
from torch.utils.data._utils.collate import default_collate_fn_map  # torch's documented extension point

from ..datasets.collate import CompactBatch
from ..datasets.views import missing_sentinel
from .buffers import BufferPool, process_pool
from .reader import DenseBatch, OrderedCells, as_response, build_compact, build_dense


class CompactResponses:
    """An item's ``responses`` over its ``n`` selected neurons, kept as the stored row.

    ``responses[p]`` is neuron ``p``'s ``(R, T)`` float tensor (integer counts as float32),
    or the ``(1, 1)`` NaN sentinel where the pair is missing, as in ``ds[i]["responses"]``;
    ``len`` and iteration work the same. ``row`` holds the valid cells as stored.
    """

    def __init__(self, row: OrderedCells, n: int) -> None:
        self.row, self.n = row, n
        self._offsets = np.concatenate([[0], np.cumsum(row.sizes)]).astype(np.int64)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, p: int | slice) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(p, slice):
            return [self[i] for i in range(*p.indices(self.n))]
        p = operator.index(p)
        q = p + self.n if p < 0 else p
        if not 0 <= q < self.n:
            raise IndexError(f"neuron position {p} out of range for {self.n} selected neurons")
        k = int(np.searchsorted(self.row.positions, q))
        if k == len(self.row.positions) or self.row.positions[k] != q:
            return missing_sentinel()
        return self._cell(k)

    def _cell(self, k: int) -> torch.Tensor:
        r, t = int(self.row.repeats[k]), int(self.row.lengths[k])
        return as_response(self.row.values[self._offsets[k]:self._offsets[k + 1]].reshape(r, t))

    def __iter__(self) -> Iterator[torch.Tensor]:
        cells = dict(zip(self.row.positions.tolist(), range(len(self.row.positions))))
        for p in range(self.n):
            k = cells.get(p)
            yield missing_sentinel() if k is None else self._cell(k)

    def __repr__(self) -> str:
        return f"CompactResponses({len(self.row.positions)} valid of {self.n} neurons, {self.row.values.dtype})"


class StreamItem(dict):
    """One streamed item: the ``ds[i]`` dict, with compact ``responses`` (:class:`CompactResponses`).

    ``neural_collate`` and ``compact_collate`` batch these items from their stored rows.
    """

    @staticmethod
    def collate_items(batch: Sequence[Any], fmt: str, neuron_index: Sequence[int] | None = None
                      ) -> DenseBatch | CompactBatch | None:
        """``fmt`` = ``"dense"`` (``neural_collate``) or ``"compact"`` (``compact_collate``) of
        ``batch``, built from the rows; None when ``batch`` is not all such items of one selection
        (the caller then collates generically)."""
        if not all(isinstance(it, StreamItem) for it in batch):
            return None
        responses = [it["responses"] for it in batch]
        if len({r.n for r in responses}) != 1:
            return None
        rows = [r.row for r in responses]
        stims = [it["stims"] for it in batch]
        metas = [it["stim_meta"] for it in batch]
        pool = _collate_pool(fmt)
        if fmt == "dense":
            return build_dense(rows, stims, metas, responses[0].n, pool)
        out = build_compact(rows, stims, metas, pool)
        if neuron_index is not None:
            ids = np.asarray(list(neuron_index), dtype=np.int64)
            out.neuron_index.numpy()[...] = ids[np.concatenate([r.positions for r in rows])]
        return out


def make_items(rows: Sequence[OrderedCells], stims: Sequence[torch.Tensor], metas: Sequence[dict],
               masks: torch.Tensor, n_selected: int) -> list[StreamItem]:
    """Items equal to ``ds[i]`` (responses over the selected neurons, the sentinel where missing)."""
    return [StreamItem(stims=stims[b], responses=CompactResponses(row, n_selected), valid_mask=masks[b],
                       stim_meta=metas[b]) for b, row in enumerate(rows)]


def _collate_pool(fmt: str) -> BufferPool:
    """Where a collate builds its batch: in a DataLoader worker, shared memory reused once the main
    process drops the batch (the worker lives for a pass, or longer with persistent workers);
    in the main process, fresh private memory (nothing would return the buffers of a long-lived pool)."""
    if get_worker_info() is None:
        return BufferPool(shared=False, slots=0)
    return process_pool(fmt)


def _refuse_default_collate(batch: Sequence[StreamItem], *, collate_fn_map: Any = None) -> None:
    raise TypeError(
        "default_collate cannot batch items of a StreamingNeuralDataset: their responses are ragged (one "
        "(R, T) tensor per neuron, or the (1, 1) NaN sentinel). Pass DataLoader(..., collate_fn=compact_collate) "
        "(valid cells only, integer counts; from deepstrf.utils.data) or collate_fn=neural_collate (deepSTRF's "
        "dense format), or let the dataset build the batches: StreamingNeuralDataset(..., batch_size=B) with "
        "DataLoader(ds, batch_size=None) or ds.loader()")


default_collate_fn_map[StreamItem] = _refuse_default_collate
