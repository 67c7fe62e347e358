"""Where the cells of a compact batch lie, grouped by shape: the plan of its whole-tensor operations.

A :class:`~deepstrf.datasets.collate.CompactBatch` keeps ragged cells back to
back in one flat ``values`` tensor. Its operations never loop over cells:
cells of one shape ``(R, T)`` form a group, and each group is handled with a
few whole-tensor operations (a view of consecutive cells, or a gather of
scattered ones). A batch has a few shapes (one per stimulus length and
repeat count), so the Python work per batch is small and independent of the
number of cells. The plan is computed once per batch on the host, from host
copies of the index arrays, so nothing is read back from an accelerator per
cell.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ShapeGroup:
    """The cells of one shape ``(repeats, length)``.

    ``host_cells`` are their indices (host); ``cells`` selects them in a
    batch tensor: a slice when they are consecutive (their counts are then one
    contiguous run of ``values``, from ``first_offset``, viewed without a
    copy), else their indices on the batch's device, with ``starts`` the
    offsets of their counts in ``values``.
    """

    repeats: int
    length: int
    host_cells: np.ndarray
    cells: slice | torch.Tensor
    starts: torch.Tensor | None = None
    first_offset: int = 0

    def counts(self, values: torch.Tensor) -> torch.Tensor:
        """The group's counts ``(k, repeats, length)`` (a view for consecutive cells, else a gather)."""
        k, r, t = len(self.host_cells), self.repeats, self.length
        if r * t == 0:
            return values.new_zeros((k, r, t))
        if self.starts is None:
            return values[self.first_offset:self.first_offset + k * r * t].view(k, r, t)
        return values.unfold(0, r * t, 1)[self.starts].view(k, r, t)

    def repeat(self, values: torch.Tensor, j: int) -> torch.Tensor:
        """Repeat ``j`` of every cell of the group, ``(k, length)``."""
        if self.starts is None or self.length == 0:
            return self.counts(values)[:, j]
        return values.unfold(0, self.length, 1)[self.starts + j * self.length]


@dataclass(frozen=True)
class CellPlan:
    """Shape groups of a batch's cells (every cell is in one), and its largest repeat count and length."""

    n_cells: int
    max_repeats: int
    max_length: int
    groups: tuple[ShapeGroup, ...]

    @classmethod
    def of(cls, offsets: np.ndarray, repeats: np.ndarray, lengths: np.ndarray, device: torch.device) -> "CellPlan":
        """The plan of cells with these host-side ``offsets`` (``n + 1``), ``repeats`` and ``lengths``;
        index tensors are placed on ``device``."""
        n = len(repeats)
        if n == 0:
            return cls(0, 0, 0, ())
        repeats, lengths = repeats.astype(np.int64), lengths.astype(np.int64)
        T = int(lengths.max())
        shape_ids, inverse = np.unique(repeats * (T + 1) + lengths, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(inverse, minlength=len(shape_ids)))])
        consecutive = [int(order[hi - 1]) - int(order[lo]) + 1 == hi - lo for lo, hi in zip(bounds[:-1], bounds[1:])]
        # the cell indices and count offsets of every scattered group cross to the device in one copy
        on_device = None if all(consecutive) else \
            torch.from_numpy(np.stack([order, offsets[order]]).astype(np.int64)).to(device)
        groups = []
        for g, (lo, hi) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
            cells = order[lo:hi]
            r, t = int(repeats[cells[0]]), int(lengths[cells[0]])
            if consecutive[g]:
                first = int(cells[0])
                groups.append(ShapeGroup(r, t, cells, slice(first, first + len(cells)), None, int(offsets[first])))
            else:
                groups.append(ShapeGroup(r, t, cells, on_device[0, lo:hi], on_device[1, lo:hi]))
        return cls(n, int(repeats.max()), T, tuple(groups))


def launch_bound(device: torch.device) -> bool:
    """Whether work on ``device`` costs per kernel launch rather than per byte (an accelerator):
    there, fewer and larger operations win; on a CPU, fewer passes over memory."""
    return device.type != "cpu"


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor. On the CPU it comes from numpy, which maps large arrays with huge
    pages (torch's allocator does not): filling 400 MB then costs 4x less than page faults."""
    if device.type != "cpu" or dtype == torch.bfloat16:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.from_numpy(np.empty(shape, dtype=torch.empty(0, dtype=dtype).numpy().dtype))
