"""Turn one batched raw read into items, dense batches or compact batches.

The rows come from one :func:`deepstrf.datasets.views.read_raw_rows` call per
batch (store-backed grids answer it with concurrent range reads). Compact
batches are built straight from the rows, so integer counts stay integers and
no per-item float tensors are made; dense batches are filled from the rows
directly too. Both equal what ``neural_collate`` / ``compact_collate`` make
of the map-style items (compact: up to the dtype of ``values``).

Batches are assembled with numpy (torch's intra-op threads make many small
copies slow) into tensors that, inside a DataLoader worker, live in shared
memory already, so handing the batch to the main process copies nothing more
(the trick ``default_collate`` uses). The counts of a compact batch from a
store are decoded straight into its buffer (see ``StreamingNeuralDataset``);
other rows are copied into it once.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..datasets.collate import CompactBatch
from ..datasets.views import RawRow, missing_sentinel


@dataclass(frozen=True)
class Selection:
    """What items expose: global ids of the selected neurons, in item order."""

    neurons: np.ndarray

    @classmethod
    def of(cls, neurons: Sequence[int]) -> "Selection":
        return cls(np.asarray(list(neurons), dtype=np.int64))

    def positions(self, n_total: int) -> np.ndarray:
        """Lookup table global neuron id -> position in the selection (-1 if absent)."""
        pos = np.full(n_total, -1, dtype=np.int64)
        pos[self.neurons] = np.arange(len(self.neurons))
        return pos


@dataclass
class OrderedCells(RawRow):
    """One row's cells restricted to the selection and in selection order (``positions``)."""

    positions: np.ndarray


def order_cells(row: RawRow, pos_of: np.ndarray) -> OrderedCells:
    """Keep the cells of ``row`` whose neuron is selected, sorted by selection position."""
    pos = pos_of[row.neurons] if len(row.neurons) else np.zeros(0, dtype=np.int64)
    keep = pos >= 0
    sizes = row.sizes
    if keep.all() and (np.diff(pos) > 0).all():
        return OrderedCells(row.stim, row.neurons, row.repeats, row.lengths, row.values, pos)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    order = np.flatnonzero(keep)[np.argsort(pos[keep], kind="stable")]
    values = (np.concatenate([row.values[starts[c]:starts[c] + sizes[c]] for c in order])
              if len(order) else row.values[:0])
    return OrderedCells(row.stim, row.neurons[order], row.repeats[order], row.lengths[order], values, pos[order])


def as_response(cell: np.ndarray) -> torch.Tensor:
    """A stored cell as map-style access returns it: float (integer counts become float32)."""
    t = torch.from_numpy(np.ascontiguousarray(cell))
    return t if t.is_floating_point() else t.to(torch.float32)


def alloc(shape: tuple[int, ...], dtype: np.dtype, shared: bool) -> torch.Tensor:
    """An uninitialised tensor, in shared memory when ``shared``; fill it through ``.numpy()``.

    Hand the tensor itself to the DataLoader: a ``torch.from_numpy`` wrapper of
    its memory would not be known as shared and would be copied again.
    """
    numel = int(np.prod(shape))
    empty = torch.from_numpy(np.empty(0, dtype=np.dtype(dtype)))
    if not shared:
        return torch.empty(shape, dtype=empty.dtype)
    storage = empty._typed_storage()._new_shared(numel, device="cpu")
    out = empty.new(storage).view(shape)
    prefault(out)
    return out


def prefault(t: torch.Tensor) -> None:
    """Map all pages of ``t`` now, in one system call (Linux >= 5.14; a no-op elsewhere).

    Shared memory gets no transparent huge pages, so filling a fresh batch
    buffer page by page costs one fault per 4 KiB; populating it at once
    costs about a third less.
    """
    if _madvise is None or t.numel() == 0:
        return
    page = mmap.PAGESIZE
    addr = t.data_ptr()
    start = addr - addr % page
    length = addr + t.numel() * t.element_size() - start
    _madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_POPULATE_WRITE)  # failure: pages fault later


def _libc_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


_MADV_POPULATE_WRITE = 23
_madvise = _libc_madvise()


def pack_int64(arrays: Sequence[np.ndarray], shared: bool) -> list[torch.Tensor]:
    """``arrays`` as int64 tensors that are views of one buffer (one shared segment per batch, not one each)."""
    sizes = [len(a) for a in arrays]
    buf = alloc((sum(sizes),), np.int64, shared)
    parts = list(torch.split(buf, sizes))
    for part, a in zip(parts, arrays):
        part.numpy()[...] = a
    return parts


def pad_stims(stims: Sequence[torch.Tensor], shared: bool = False) -> torch.Tensor:
    """``fill_missing_data(stims, dims=-1, value=0)``: stack, zero-padding time to the longest."""
    first = stims[0]
    T = max(int(x.shape[-1]) for x in stims)
    out = alloc((len(stims), *first.shape[:-1], T), first.numpy().dtype, shared)
    view = out.numpy()
    for i, x in enumerate(stims):
        t = int(x.shape[-1])
        view[i, ..., :t] = x.numpy()
        view[i, ..., t:] = 0
    return out


def build_items(rows: Sequence[OrderedCells], stims: Sequence[torch.Tensor], metas: Sequence[dict],
                masks: torch.Tensor, n_selected: int) -> list[dict]:
    """Items identical to ``ds[i]``: responses listed over the selected neurons, sentinel where missing."""
    items = []
    for b, row in enumerate(rows):
        responses: list[torch.Tensor | None] = [None] * n_selected
        for p, cell in zip(row.positions.tolist(), row.cells()):
            responses[p] = as_response(cell)
        items.append({
            "stims": stims[b],
            "responses": [r if r is not None else missing_sentinel() for r in responses],
            "valid_mask": masks[b],
            "stim_meta": metas[b],
        })
    return items


def build_compact(rows: Sequence[OrderedCells], stims: Sequence[torch.Tensor],
                  metas: Sequence[dict], shared: bool = False, values: torch.Tensor | None = None) -> CompactBatch:
    """A :class:`CompactBatch` straight from the rows; ``values`` keeps the stored dtype.

    ``values``: the rows' values already laid out back to back (they were
    decoded into it), else they are copied into a new buffer.
    """
    sizes = np.concatenate([r.sizes for r in rows]).astype(np.int64)
    if values is None:
        dtype = np.result_type(*[r.values.dtype for r in rows])
        values = alloc((int(sizes.sum()),), dtype, shared)
        np.concatenate([r.values for r in rows], out=values.numpy())
    offsets, repeats, lengths, item_index, neuron_index, stim_lengths = pack_int64([
        np.concatenate([[0], np.cumsum(sizes)]),
        np.concatenate([r.repeats for r in rows]),
        np.concatenate([r.lengths for r in rows]),
        np.repeat(np.arange(len(rows)), [len(r.neurons) for r in rows]),
        np.concatenate([r.neurons for r in rows]),
        np.array([s.shape[-1] for s in stims])], shared)
    return CompactBatch(stims=pad_stims(stims, shared), values=values, offsets=offsets, repeats=repeats,
                        lengths=lengths, item_index=item_index, neuron_index=neuron_index,
                        stim_lengths=stim_lengths, stim_meta=list(metas))


def build_dense(rows: Sequence[OrderedCells], stims: Sequence[torch.Tensor], metas: Sequence[dict],
                n_selected: int, shared: bool = False) -> dict:
    """The ``neural_collate`` dict, filled from the rows without per-item tensors."""
    x = pad_stims(stims, shared)
    some_missing = any(len(r.neurons) < n_selected for r in rows)
    R = max([int(r.repeats.max()) for r in rows if len(r.repeats)] + [1 if some_missing else 0])
    T = max([int(r.lengths.max()) for r in rows if len(r.lengths)] + [1 if some_missing else 0])
    responses = alloc((len(rows), n_selected, R, T), x.numpy().dtype, shared)
    out = responses.numpy()
    out.fill(np.nan)
    for b, row in enumerate(rows):
        for p, cell in zip(row.positions.tolist(), row.cells()):
            out[b, p, :cell.shape[0], :cell.shape[1]] = cell
    valid = alloc(out.shape, np.bool_, shared)
    mask = valid.numpy()
    np.isnan(out, out=mask)
    np.logical_not(mask, out=mask)
    return {"stims": x, "responses": responses, "valid_mask": valid, "stim_meta": list(metas)}
