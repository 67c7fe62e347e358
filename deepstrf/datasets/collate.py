"""Batching: the dense deepSTRF format and a compact format for pools.

``neural_collate`` pads every batch to ``(B, N, R_max, T_max)`` with NaN, as
deepSTRF does. On a pool almost all of that is NaN (cross-block pairs), so
:func:`compact_collate` keeps only the valid cells, ragged, with their item
and global neuron index, and the counts in their stored dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch


def fill_missing_data(stims: Sequence[torch.Tensor], dims: int | Sequence[int], value: float = 0.0) -> torch.Tensor:
    """Stack tensors into ``(S, ...)``, padding axes ``dims`` to their maximum with ``value``."""
    if not stims:
        raise ValueError("`stims` must be a non-empty sequence of tensors")
    first = stims[0]
    if not all(isinstance(t, torch.Tensor) for t in stims):
        raise TypeError("All elements of `stims` must be torch.Tensor")
    k = first.ndim
    dims = sorted({d if d >= 0 else d + k for d in ([dims] if isinstance(dims, int) else dims)})
    for d in dims:
        if not 0 <= d < k:
            raise IndexError(f"Dimension {d} is out of bounds for tensors of ndim={k}")
    shape = list(first.shape)
    for t in stims:
        if t.ndim != k:
            raise ValueError(f"All tensors must have the same number of dims; got {t.ndim} vs {k}")
        if t.dtype != first.dtype or t.device != first.device:
            raise ValueError("All tensors must share the same dtype and device")
        for axis in range(k):
            if axis in dims:
                shape[axis] = max(shape[axis], t.shape[axis])
            elif t.shape[axis] != first.shape[axis]:
                raise ValueError(f"Dimension {axis} mismatch: got {t.shape[axis]} vs {first.shape[axis]}")
    out = torch.full((len(stims), *shape), value, dtype=first.dtype, device=first.device)
    for i, t in enumerate(stims):
        out[(i, *(slice(0, n) for n in t.shape))] = t
    return out


def _self_collated(batch: Sequence[Any], fmt: str, **options: Any) -> Any:
    """The batch built by the items' own ``collate_items`` (streamed items), or None."""
    hook = getattr(type(batch[0]), "collate_items", None) if len(batch) else None
    return None if hook is None else hook(batch, fmt, **options)


_ITEM_KEYS = ("stims", "responses", "valid_mask", "stim_meta")


def neural_collate(batch: Sequence[dict]) -> dict:
    """deepSTRF's collate: ``stims`` zero-padded to ``(B, ..., T_max)``;
    ``responses`` NaN-padded to ``(B, N, R_max, T_max)``; ``valid_mask`` is
    ``~isnan(responses)``; ``stim_meta`` a list; other keys passed as lists.

    Items that batch themselves (those of ``StreamingNeuralDataset``) are
    built from their stored rows, without per-cell tensors."""
    fast = _self_collated(batch, "dense")
    if fast is not None:
        return fast
    stims = fill_missing_data([it["stims"] for it in batch], dims=-1, value=0.0)
    resps = [it["responses"] for it in batch]
    B, N = len(batch), len(resps[0])
    R_max = max((r.shape[0] for rs in resps for r in rs), default=0)
    T_max = max((r.shape[1] for rs in resps for r in rs), default=0)
    responses = torch.full((B, N, R_max, T_max), float("nan"), dtype=stims.dtype, device=stims.device)
    for b, rs in enumerate(resps):
        for n, r in enumerate(rs):
            responses[b, n, :r.shape[0], :r.shape[1]] = r
    out = {"stims": stims, "responses": responses, "valid_mask": ~responses.isnan(),
           "stim_meta": [it["stim_meta"] for it in batch]}
    for key in batch[0]:
        if key not in _ITEM_KEYS:
            out[key] = [it[key] for it in batch]
    return out


@dataclass
class CompactBatch:
    """Valid cells of a batch, ragged, without padding across neurons.

    Cell ``c`` belongs to item ``item_index[c]`` and global neuron
    ``neuron_index[c]``; its ``(repeats[c], lengths[c])`` counts are
    ``values[offsets[c]:offsets[c + 1]]`` in row-major order, in the dtype
    they were stored in. Dict-style access (``batch["stims"]``) works.
    """

    stims: torch.Tensor
    values: torch.Tensor
    offsets: torch.Tensor
    repeats: torch.Tensor
    lengths: torch.Tensor
    item_index: torch.Tensor
    neuron_index: torch.Tensor
    stim_lengths: torch.Tensor
    stim_meta: list = field(default_factory=list)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self)]

    @property
    def n_cells(self) -> int:
        return int(self.repeats.numel())

    @property
    def batch_size(self) -> int:
        return int(self.stims.shape[0])

    def to(self, device: torch.device | str) -> "CompactBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.to(device, non_blocking=True)
        return CompactBatch(**moved)

    def time_mask(self) -> torch.Tensor:
        """``(n_cells, T_max)`` bool, True inside each cell's time range."""
        T = int(self.lengths.max()) if self.n_cells else 0
        return torch.arange(T, device=self.lengths.device)[None, :] < self.lengths[:, None]

    def repeat_sum(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(n_cells, T_max)`` counts summed over repeats, zero beyond each cell's length.

        Sufficient statistic for a Poisson likelihood (with ``repeats``).
        """
        T = int(self.lengths.max()) if self.n_cells else 0
        out = torch.zeros((self.n_cells, T), dtype=dtype, device=self.values.device)
        for c in range(self.n_cells):
            r, t = int(self.repeats[c]), int(self.lengths[c])
            cell = self.values[int(self.offsets[c]):int(self.offsets[c + 1])].view(r, t)
            out[c, :t] = cell.sum(dim=0, dtype=dtype)
        return out

    def psth(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Trial-averaged response ``(n_cells, T_max)``."""
        return self.repeat_sum(dtype) / self.repeats.to(dtype)[:, None]

    def padded(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(n_cells, R_max, T_max)`` NaN-padded cells (for metrics on repeats)."""
        R = int(self.repeats.max()) if self.n_cells else 0
        T = int(self.lengths.max()) if self.n_cells else 0
        out = torch.full((self.n_cells, R, T), float("nan"), dtype=dtype, device=self.values.device)
        for c in range(self.n_cells):
            r, t = int(self.repeats[c]), int(self.lengths[c])
            out[c, :r, :t] = self.values[int(self.offsets[c]):int(self.offsets[c + 1])].view(r, t)
        return out

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in
                   (self.stims, self.values, self.offsets, self.repeats, self.lengths,
                    self.item_index, self.neuron_index, self.stim_lengths))


def compact_collate(batch: Sequence[dict], neuron_index: Sequence[int] | None = None) -> CompactBatch:
    """Collate items into a :class:`CompactBatch` holding only valid cells.

    ``neuron_index`` maps an item's response position to a global neuron id
    (``ds.selected_neurons()``); items may instead carry it under
    ``"neuron_index"``. Without either, positions are used, except for items
    of ``StreamingNeuralDataset``, which know their neurons' global ids: they
    are batched from their stored rows, counts kept in their stored dtype.
    """
    fast = _self_collated(batch, "compact", neuron_index=neuron_index)
    if fast is not None:
        return fast
    stims = fill_missing_data([it["stims"] for it in batch], dims=-1, value=0.0)
    flat, repeats, lengths, items, neurons = [], [], [], [], []
    for b, it in enumerate(batch):
        ids = it.get("neuron_index", neuron_index)
        for p in it["valid_mask"].nonzero(as_tuple=True)[0].tolist():
            r = it["responses"][p]
            flat.append(r.reshape(-1))
            repeats.append(r.shape[0])
            lengths.append(r.shape[1])
            items.append(b)
            neurons.append(p if ids is None else int(ids[p]))
    sizes = torch.tensor([0] + [f.numel() for f in flat], dtype=torch.int64)
    values = torch.cat(flat) if flat else torch.zeros(0)
    return CompactBatch(
        stims=stims, values=values, offsets=sizes.cumsum(0),
        repeats=torch.tensor(repeats, dtype=torch.int64), lengths=torch.tensor(lengths, dtype=torch.int64),
        item_index=torch.tensor(items, dtype=torch.int64), neuron_index=torch.tensor(neurons, dtype=torch.int64),
        stim_lengths=torch.tensor([it["stims"].shape[-1] for it in batch], dtype=torch.int64),
        stim_meta=[it["stim_meta"] for it in batch])
