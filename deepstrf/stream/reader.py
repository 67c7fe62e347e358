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
other rows are copied into it once. Large buffers come from a
:class:`~deepstrf.stream.buffers.BufferPool`, which reuses them once the
consumer has dropped the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..datasets.collate import CompactBatch, check_stim_batch, dense_response_dtype
from ..datasets.views import RawRow
from .buffers import BufferPool


@dataclass(frozen=True)
class Selection:
    """What items expose: global ids of the selected neurons, in item order."""

    neurons: np.ndarray

    @classmethod
    def of(cls, neurons: Sequence[int], where: str) -> "Selection":
        """The selection of ``neurons`` (of the dataset ``where``), each of them once."""
        ids = np.asarray(list(neurons), dtype=np.int64)
        check_unique(ids, f"the neuron selection of {where}")
        return cls(ids)

    def positions(self, n_total: int) -> np.ndarray:
        """Lookup table global neuron id -> position in the selection (-1 if absent)."""
        pos = np.full(n_total, -1, dtype=np.int64)
        pos[self.neurons] = np.arange(len(self.neurons))
        return pos


def check_unique(neurons: Sequence[int] | np.ndarray, what: str) -> None:
    """Refuse a neuron selection that names a neuron more than once: a stream's batches identify a
    cell by its neuron's global id (``CompactBatch.neuron_index``, ``to_dense``), so a neuron has
    one position only (map-style ``select_population`` keeps duplicates; streaming cannot)."""
    ids, counts = np.unique(np.asarray(neurons, dtype=np.int64), return_counts=True)
    if (counts > 1).any():
        twice = ids[counts > 1].tolist()
        raise ValueError(f"{what} names neurons {twice[:10]} more than once; a stream "
                         "identifies each cell by its neuron's id, so select each neuron once (e.g. "
                         "list(dict.fromkeys(neurons)))")


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


def pack_int64(arrays: Sequence[np.ndarray], pool: BufferPool) -> list[torch.Tensor]:
    """``arrays`` as int64 tensors that are views of one buffer (one shared segment per batch, not one each)."""
    sizes = [len(a) for a in arrays]
    buf = pool.alloc((sum(sizes),), np.int64)
    parts = list(torch.split(buf, sizes))
    for part, a in zip(parts, arrays):
        part.numpy()[...] = a
    return parts


def pad_stims(stims: Sequence[torch.Tensor], metas: Sequence[dict], pool: BufferPool) -> torch.Tensor:
    """``fill_missing_data(stims, dims=-1, value=0)``: stack, zero-padding time to the longest;
    stimuli the in-memory collates would refuse are refused alike (``metas`` name them), except
    floating ones of two dtypes (a pool of float32 and float64 sources), cast to the first one's."""
    check_stim_batch(stims, metas, floats_may_differ=True)
    first = stims[0]
    T = max(int(x.shape[-1]) for x in stims)
    out = pool.alloc((len(stims), *first.shape[:-1], T), first.numpy().dtype)
    view = out.numpy()
    for i, x in enumerate(stims):
        t = int(x.shape[-1])
        view[i, ..., :t] = x.numpy()
        view[i, ..., t:] = 0
    return out


def build_compact(rows: Sequence[OrderedCells], stims: Sequence[torch.Tensor],
                  metas: Sequence[dict], pool: BufferPool, values: torch.Tensor | None = None) -> CompactBatch:
    """A :class:`CompactBatch` straight from the rows; ``values`` keeps the stored dtype.

    ``values``: the rows' values already laid out back to back (they were
    decoded into it, from ``pool``), else they are copied into a buffer of
    ``pool``. The batch carries the leases of its pooled shared buffers.
    """
    sizes = np.concatenate([r.sizes for r in rows]).astype(np.int64)
    if values is None:
        dtype = np.result_type(*[r.values.dtype for r in rows])
        values = pool.alloc((int(sizes.sum()),), dtype)
        np.concatenate([r.values for r in rows], out=values.numpy())
    offsets, repeats, lengths, item_index, neuron_index, stim_lengths = pack_int64([
        np.concatenate([[0], np.cumsum(sizes)]),
        np.concatenate([r.repeats for r in rows]),
        np.concatenate([r.lengths for r in rows]),
        np.repeat(np.arange(len(rows)), [len(r.neurons) for r in rows]),
        np.concatenate([r.neurons for r in rows]),
        np.array([s.shape[-1] for s in stims])], pool)
    batch = CompactBatch(stims=pad_stims(stims, metas, pool), values=values, offsets=offsets, repeats=repeats,
                         lengths=lengths, item_index=item_index, neuron_index=neuron_index,
                         stim_lengths=stim_lengths, stim_meta=list(metas))
    if pool.shared:
        batch._leases = pool.leases(getattr(batch, k) for k in batch.keys() if k != "stim_meta")
    return batch


class DenseBatch(dict):
    """The ``neural_collate`` dict, as built by the streaming layer: a plain dict to its consumer,
    which can carry the leases of the reused shared buffers it was built in (``_leases``)."""


def build_dense(rows: Sequence[OrderedCells], stims: Sequence[torch.Tensor], metas: Sequence[dict],
                n_selected: int, pool: BufferPool) -> DenseBatch:
    """The ``neural_collate`` dict, filled from the rows without per-item or per-cell tensors.

    Every byte of ``responses`` and ``valid_mask`` is written once: the cells' counts (cast to
    :func:`~deepstrf.datasets.collate.dense_response_dtype` of the stimuli), NaN / False only
    where there is no data (missing neurons, and the repeats and time bins beyond a cell's own).
    Nothing is read back (no ``isnan`` pass).
    """
    x = pad_stims(stims, metas, pool)
    some_missing = any(len(r.neurons) < n_selected for r in rows)
    R = max([int(r.repeats.max()) for r in rows if len(r.repeats)] + [1 if some_missing else 0])
    T = max([int(r.lengths.max()) for r in rows if len(r.lengths)] + [1 if some_missing else 0])
    dtype = torch.empty(0, dtype=dense_response_dtype(x.dtype)).numpy().dtype
    responses = pool.alloc((len(rows), n_selected, R, T), dtype)
    valid = pool.alloc((len(rows), n_selected, R, T), np.bool_)
    out, mask = responses.numpy(), valid.numpy()
    for b, row in enumerate(rows):
        fill_dense_row(row, out[b], mask[b])
    batch = DenseBatch(stims=x, responses=responses, valid_mask=valid, stim_meta=list(metas))
    if pool.shared:
        batch._leases = pool.leases((x, responses, valid))
    return batch


def fill_dense_row(row: OrderedCells, out: np.ndarray, mask: np.ndarray) -> None:
    """Write one item's ``(N, R, T)`` block of a dense batch: runs of cells at consecutive
    positions with the same shape are copied in one assignment each (a source's row is
    usually one run), the positions without a cell are NaN / False."""
    n, R, T = out.shape
    covered = np.zeros(n + 1, dtype=np.int64)  # +1 at each run's start, -1 at its end
    for p, r, t, vals in _cell_runs(row):
        k = len(vals)
        out[p:p + k, :r, :t] = vals
        mask[p:p + k, :r, :t] = True
        if t < T:
            out[p:p + k, :r, t:] = np.nan
            mask[p:p + k, :r, t:] = False
        if r < R:
            out[p:p + k, r:] = np.nan
            mask[p:p + k, r:] = False
        covered[p] += 1
        covered[p + k] -= 1
    uncovered = (np.cumsum(covered[:n]) == 0).astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], uncovered, [0]])))
    for lo, hi in zip(edges[::2].tolist(), edges[1::2].tolist()):
        out[lo:hi] = np.nan
        mask[lo:hi] = False


def _cell_runs(row: OrderedCells):
    """``(position, R, T, values (k, R, T))`` for maximal runs of cells at consecutive positions
    with equal shapes, in order."""
    pos, reps, lens = row.positions, row.repeats, row.lengths
    if not len(pos):
        return
    breaks = np.flatnonzero((np.diff(pos) != 1) | (np.diff(reps) != 0) | (np.diff(lens) != 0)) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(pos)]])
    offsets = np.concatenate([[0], np.cumsum(row.sizes)])
    for a, b in zip(starts.tolist(), stops.tolist()):
        r, t = int(reps[a]), int(lens[a])
        yield int(pos[a]), r, t, row.values[offsets[a]:offsets[b]].reshape(b - a, r, t)
