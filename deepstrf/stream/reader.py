"""Turn one batched raw read into items, dense batches or compact batches.

The rows come from one :func:`deepstrf.datasets.views.read_raw_rows` call per
batch (store-backed grids answer it with concurrent range reads). Compact
batches are built straight from the rows, so integer counts stay integers and
no per-item float tensors are made; dense batches are filled from the rows
directly too. Both equal what ``neural_collate`` / ``compact_collate`` make
of the map-style items (compact: up to the dtype of ``values``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..datasets.collate import CompactBatch, fill_missing_data
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
class OrderedCells:
    """One row's cells restricted to the selection and in selection order."""

    positions: np.ndarray
    neurons: np.ndarray
    repeats: np.ndarray
    lengths: np.ndarray
    values: np.ndarray

    @property
    def sizes(self) -> np.ndarray:
        return self.repeats * self.lengths

    def cells(self) -> list[np.ndarray]:
        out, start = [], 0
        for r, t in zip(self.repeats.tolist(), self.lengths.tolist()):
            out.append(self.values[start:start + r * t].reshape(r, t))
            start += r * t
        return out


def order_cells(row: RawRow, pos_of: np.ndarray) -> OrderedCells:
    """Keep the cells of ``row`` whose neuron is selected, sorted by selection position."""
    pos = pos_of[row.neurons] if len(row.neurons) else np.zeros(0, dtype=np.int64)
    keep = pos >= 0
    sizes = row.repeats * row.lengths
    if keep.all() and (np.diff(pos) > 0).all():
        return OrderedCells(pos, row.neurons, row.repeats, row.lengths, row.values)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    order = np.flatnonzero(keep)[np.argsort(pos[keep], kind="stable")]
    values = (np.concatenate([row.values[starts[c]:starts[c] + sizes[c]] for c in order])
              if len(order) else row.values[:0])
    return OrderedCells(pos[order], row.neurons[order], row.repeats[order], row.lengths[order], values)


def as_response(cell: np.ndarray) -> torch.Tensor:
    """A stored cell as map-style access returns it: float (integer counts become float32)."""
    t = torch.from_numpy(np.ascontiguousarray(cell))
    return t if t.is_floating_point() else t.to(torch.float32)


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
                  metas: Sequence[dict]) -> CompactBatch:
    """A :class:`CompactBatch` straight from the rows; ``values`` keeps the stored dtype."""
    sizes = np.concatenate([r.sizes for r in rows]).astype(np.int64)
    values = np.concatenate([r.values for r in rows])
    return CompactBatch(
        stims=fill_missing_data(list(stims), dims=-1, value=0.0),
        values=torch.from_numpy(values),
        offsets=torch.from_numpy(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)),
        repeats=torch.from_numpy(np.concatenate([r.repeats for r in rows]).astype(np.int64)),
        lengths=torch.from_numpy(np.concatenate([r.lengths for r in rows]).astype(np.int64)),
        item_index=torch.from_numpy(np.repeat(np.arange(len(rows)), [len(r.neurons) for r in rows])),
        neuron_index=torch.from_numpy(np.concatenate([r.neurons for r in rows]).astype(np.int64)),
        stim_lengths=torch.tensor([s.shape[-1] for s in stims], dtype=torch.int64),
        stim_meta=list(metas))


def build_dense(rows: Sequence[OrderedCells], stims: Sequence[torch.Tensor], metas: Sequence[dict],
                n_selected: int) -> dict:
    """The ``neural_collate`` dict, filled from the rows without per-item tensors."""
    x = fill_missing_data(list(stims), dims=-1, value=0.0)
    some_missing = any(len(r.neurons) < n_selected for r in rows)
    R = max([int(r.repeats.max()) for r in rows if len(r.repeats)] + [1 if some_missing else 0])
    T = max([int(r.lengths.max()) for r in rows if len(r.lengths)] + [1 if some_missing else 0])
    responses = torch.full((len(rows), n_selected, R, T), float("nan"), dtype=x.dtype)
    out = responses.numpy()
    for b, row in enumerate(rows):
        for p, cell in zip(row.positions.tolist(), row.cells()):
            out[b, p, :cell.shape[0], :cell.shape[1]] = cell
    return {"stims": x, "responses": responses, "valid_mask": ~responses.isnan(), "stim_meta": list(metas)}
