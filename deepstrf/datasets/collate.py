"""Batching: the dense deepSTRF format and a compact format for pools.

``neural_collate`` pads every batch to ``(B, N, R_max, T_max)`` with NaN, as
deepSTRF does. On a pool almost all of that is NaN (cross-block pairs), so
:func:`compact_collate` keeps only the valid cells, ragged, with their item
and global neuron index, and the counts in their stored dtype.
"""

from __future__ import annotations

import math

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from . import cells
from .cells import CellPlan, ShapeGroup, empty


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


def stim_batch_problem(stims: Sequence[torch.Tensor], metas: Sequence[Any] | None = None,
                       floats_may_differ: bool = False) -> str | None:
    """Why ``stims`` cannot be stacked into one batch, or None: the first stimulus whose dtype, or
    shape apart from time (e.g. its channel count), differs from the first one's, named by its
    position in the batch (and its ``uid``). ``floats_may_differ``: floating dtypes may differ
    (the batch is cast to the first one's, which loses nothing a model reads)."""
    first = stims[0]
    for i, x in enumerate(stims[1:], 1):
        this, that = _item_name(i, metas), _item_name(0, metas)
        if x.dtype != first.dtype and not (floats_may_differ and x.is_floating_point() and first.is_floating_point()):
            return f"the batch's item {this} has {x.dtype} stimuli, its item {that} {first.dtype}"
        if x.shape[:-1] != first.shape[:-1]:
            return (f"the batch's item {this} has stimuli of shape ({', '.join(map(str, x.shape[:-1]))}, T), "
                    f"its item {that} ({', '.join(map(str, first.shape[:-1]))}, T)")
    return None


def check_stim_batch(stims: Sequence[torch.Tensor], metas: Sequence[Any] | None = None,
                     floats_may_differ: bool = False) -> None:
    """Refuse stimuli that cannot be batched together (:func:`stim_batch_problem`), saying what to do;
    the in-memory collates and the streamed batches refuse alike (streamed batches also take
    float32 and float64 stimuli together, as they always did)."""
    problem = stim_batch_problem(stims, metas, floats_may_differ)
    if problem is not None:
        raise ValueError(
            f"cannot batch these items: {problem}. Stimuli batched together need one dtype and one shape "
            "apart from time: convert the sources' stimuli to one (e.g. uint8 frames to float32 with the "
            "scale you want, RGB frames to grayscale) before pooling, or batch each source on its own "
            "(StreamingNeuralDataset(..., source_homogeneous=True), or SourceBatchSampler)")


def _item_name(i: int, metas: Sequence[Any] | None) -> str:
    uid = metas[i].get("uid") if metas is not None and isinstance(metas[i], dict) else None
    return f"{i}" if uid is None else f"{i} (uid {uid!r})"


def _self_collated(batch: Sequence[Any], fmt: str, **options: Any) -> Any:
    """The batch built by the items' own ``collate_items`` (streamed items), or None."""
    hook = getattr(type(batch[0]), "collate_items", None) if len(batch) else None
    return None if hook is None else hook(batch, fmt, **options)


_ITEM_KEYS = ("stims", "responses", "valid_mask", "stim_meta")


def dense_response_dtype(stim_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a dense batch's ``responses``: the stimuli's if it is floating, else float32
    (integer frames such as uint8 video cannot hold NaN padding or counts like 300 or 1.5)."""
    return stim_dtype if stim_dtype.is_floating_point else torch.float32


def neural_collate(batch: Sequence[dict]) -> dict:
    """deepSTRF's collate: ``stims`` zero-padded to ``(B, ..., T_max)``;
    ``responses`` NaN-padded to ``(B, N, R_max, T_max)``, in the stimuli's dtype if it is
    floating, else float32 (:func:`dense_response_dtype`); ``valid_mask`` is
    ``~isnan(responses)``; ``stim_meta`` a list; other keys passed as lists.

    Items that batch themselves (those of ``StreamingNeuralDataset``) are
    built from their stored rows, without per-cell tensors."""
    fast = _self_collated(batch, "dense")
    if fast is not None:
        return fast
    check_stim_batch([it["stims"] for it in batch], [it.get("stim_meta") for it in batch])
    stims = fill_missing_data([it["stims"] for it in batch], dims=-1, value=0.0)
    resps = [it["responses"] for it in batch]
    B, N = len(batch), len(resps[0])
    R_max = max((r.shape[0] for rs in resps for r in rs), default=0)
    T_max = max((r.shape[1] for rs in resps for r in rs), default=0)
    responses = torch.full((B, N, R_max, T_max), float("nan"), dtype=dense_response_dtype(stims.dtype),
                           device=stims.device)
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

    Its operations work on whole tensors, one group of same-shaped cells at a
    time (:mod:`~deepstrf.datasets.cells`), on any device: the plan is made on
    the host from the index arrays, which :meth:`to` keeps a host copy of, so
    a batch on an accelerator is never read back per cell.
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

    def __getstate__(self) -> dict:
        # the plan and the host index are remade where the batch lands (the plan holds device tensors)
        return {k: v for k, v in self.__dict__.items() if k not in ("_plan", "_host")}

    def keys(self) -> list[str]:
        return [f.name for f in fields(self)]

    @property
    def n_cells(self) -> int:
        return int(self.repeats.numel())

    @property
    def batch_size(self) -> int:
        return int(self.stims.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "CompactBatch":
        """The batch on ``device``; it keeps the host index arrays, for its plan."""
        return self._map(lambda v: v.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "CompactBatch":
        """The batch in page-locked memory (what ``DataLoader(pin_memory=True)`` calls; needs an accelerator)."""
        return self._map(lambda v: v.pin_memory())

    def _map(self, move: Any) -> "CompactBatch":
        host = self.host_index()
        moved = CompactBatch(**{f.name: move(v) if isinstance(v := getattr(self, f.name), torch.Tensor) else v
                                for f in fields(self)})
        moved._host = host
        return moved

    def host_index(self) -> dict[str, torch.Tensor]:
        """The index arrays (``offsets``, ``repeats``, ``lengths``, ``item_index``, ``neuron_index``)
        on the host: the batch's own on a CPU batch, else the copy :meth:`to` kept (or one copy
        made now, for a batch built on an accelerator)."""
        kept = getattr(self, "_host", None)
        if kept is None:
            kept = self._host = {k: getattr(self, k).cpu() for k in _INDEX_KEYS}
        return kept

    def plan(self) -> CellPlan:
        """The batch's cells grouped by shape (made once, on the host)."""
        plan = getattr(self, "_plan", None)
        if plan is None:
            host = self.host_index()
            plan = CellPlan.of(host["offsets"].numpy(), host["repeats"].numpy(), host["lengths"].numpy(),
                               self.values.device)
            self._plan = plan
        return plan

    def check_rates(self, pred: torch.Tensor) -> None:
        """Raise a ValueError unless ``pred`` holds one row per cell ``(n_cells, T')`` covering every
        cell's length (checked on the host plan: nothing is read back from a device)."""
        if pred.dim() != 2 or pred.shape[0] != self.n_cells:
            raise ValueError(f"pred must be (n_cells={self.n_cells}, T), got {tuple(pred.shape)}")
        need = self.plan().max_length
        if pred.shape[1] < need:
            raise ValueError(f"prediction covers {pred.shape[1]} bins, cells need {need}")

    def n_observations(self) -> int:
        """Observed (cell, repeat, bin) counts: ``sum(repeats * lengths)``, from the host plan."""
        return sum(g.repeats * g.length * len(g.host_cells) for g in self.plan().groups)

    def time_mask(self) -> torch.Tensor:
        """``(n_cells, T_max)`` bool, True inside each cell's time range."""
        T = self.plan().max_length
        return torch.arange(T, device=self.lengths.device)[None, :] < self.lengths[:, None]

    def repeat_sum(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(n_cells, T_max)`` counts summed over repeats, zero beyond each cell's length.

        Sufficient statistic for a Poisson likelihood (with ``repeats``).
        """
        plan = self.plan()
        shape, device = (plan.n_cells, plan.max_length), self.values.device
        launch_bound = cells.launch_bound(device)  # then one fill beats a write per group past its length
        out = torch.zeros(shape, dtype=dtype, device=device) if launch_bound else empty(shape, dtype, device)
        for g in plan.groups:  # every cell is in one group: each row is written once
            if g.starts is None:  # consecutive cells: summed straight into the output
                self.group_repeat_sum(g, dtype, out=out[g.cells, :g.length])
            else:
                out[g.cells, :g.length] = self.group_repeat_sum(g, dtype)
            if not launch_bound:
                out[g.cells, g.length:] = 0
        return out

    def group_repeat_sum(self, group: ShapeGroup, dtype: torch.dtype = torch.float32,
                         out: torch.Tensor | None = None, exact: bool = False) -> torch.Tensor:
        """``(k, length)`` counts of one shape group of the plan, summed over repeats, as ``dtype``
        (into ``out``), or with ``exact`` in the integer dtype they were summed in (small integer
        counts: the narrowest that holds the sum; other counts: ``dtype``)."""
        # integer counts are summed exactly in the narrowest integer type (half the bytes of float32
        # for uint8), cast once; on an accelerator, where launches cost and bytes do not, in ``dtype``
        # if it holds every sum exactly
        launch_bound = cells.launch_bound(self.values.device)
        acc_dtype = _sum_dtype(self.values.dtype, group.repeats, into=dtype if launch_bound else None) or dtype
        direct = out is not None and acc_dtype == dtype
        acc = out if direct else empty((len(group.host_cells), group.length), acc_dtype, self.values.device)
        if group.repeats == 0:
            acc.zero_()
        elif launch_bound:  # one reduction
            torch.sum(group.counts(self.values), 1, dtype=acc_dtype, out=acc)
        else:  # on a CPU one pass per repeat beats a reduction over a middle axis
            acc.copy_(group.repeat(self.values, 0))
            for j in range(1, group.repeats):
                acc.add_(group.repeat(self.values, j))
        if direct or out is None and (exact or acc_dtype == dtype):
            return acc
        if out is None:
            out = empty(tuple(acc.shape), dtype, acc.device)
        return out.copy_(acc)

    def psth(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Trial-averaged response ``(n_cells, T_max)``."""
        return self.repeat_sum(dtype) / self.repeats.to(dtype)[:, None]

    def padded(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(n_cells, R_max, T_max)`` NaN-padded cells (for metrics on repeats)."""
        plan = self.plan()
        out = empty((plan.n_cells, plan.max_repeats, plan.max_length), dtype, self.values.device).fill_(math.nan)
        self._write_cells(out)
        return out

    def to_dense(self, neurons: Sequence[int] | np.ndarray | torch.Tensor) -> dict:
        """The ``neural_collate`` batch of the same items, built where the batch is (e.g. on a GPU).

        ``neurons``: the dense batch's neuron axis, as global neuron ids in
        order (``ds.selected_neurons()``; ``range(N)`` for a batch whose
        ``neuron_index`` holds positions). ``responses`` ``(B, N, R_max,
        T_max)`` in :func:`dense_response_dtype` of the stimuli, NaN wherever there is no count (as
        ``neural_collate`` pads the ``(1, 1)`` NaN sentinel of a missing pair),
        ``valid_mask``, ``stims`` and ``stim_meta`` as they are.
        """
        flat, n = self._dense_positions(neurons)
        plan, B = self.plan(), self.batch_size
        some_missing = plan.n_cells < B * n
        R = max(plan.max_repeats, int(some_missing))
        T = max(plan.max_length, int(some_missing))
        device = self.values.device
        responses = empty((B * n, R, T), dense_response_dtype(self.stims.dtype), device).fill_(math.nan)
        valid = empty((B * n, R, T), torch.bool, device).fill_(False)
        for g, where in self._write_cells(responses, flat):
            valid[where, :g.repeats, :g.length] = True
        shape = (B, n, R, T)
        return {"stims": self.stims, "responses": responses.view(shape), "valid_mask": valid.view(shape),
                "stim_meta": list(self.stim_meta)}

    def _write_cells(self, out: torch.Tensor,
                     rows: np.ndarray | None = None) -> list[tuple[ShapeGroup, slice | torch.Tensor]]:
        """Write every cell's counts into ``out[row, :R, :T]``, cast to ``out``'s dtype, one shape group
        at a time. ``rows``: each cell's row of ``out`` (host; default: the cell's own index). Returns
        each group with where its rows went."""
        placed = []
        for g in self.plan().groups:
            if rows is None:
                where = g.cells
            else:
                r = rows[g.host_cells]
                consecutive = (np.diff(r) == 1).all()  # e.g. an item's run of neurons
                where = slice(int(r[0]), int(r[-1]) + 1) if consecutive else torch.from_numpy(r).to(out.device)
            if isinstance(where, slice):  # consecutive rows: copied, cast in place
                out[where, :g.repeats, :g.length].copy_(g.counts(self.values))
            else:
                out[where, :g.repeats, :g.length] = g.counts(self.values).to(out.dtype)
            placed.append((g, where))
        return placed

    def _dense_positions(self, neurons: Sequence[int] | np.ndarray | torch.Tensor) -> tuple[np.ndarray, int]:
        """Each cell's row ``item * N + position`` of the dense batch (host), and ``N``."""
        ids = np.asarray(neurons.cpu() if isinstance(neurons, torch.Tensor) else list(neurons), dtype=np.int64)
        host = self.host_index()
        cell_ids = host["neuron_index"].numpy()
        lookup = np.full(max(int(ids.max(initial=-1)), int(cell_ids.max(initial=-1))) + 1, -1, dtype=np.int64)
        lookup[ids] = np.arange(len(ids))
        pos = lookup[cell_ids]
        if (pos < 0).any():
            missing = sorted(set(cell_ids[pos < 0].tolist()))
            raise ValueError(f"to_dense: the batch has cells of neurons {missing[:10]} that are not in `neurons` "
                             f"({len(ids)} ids); pass the dataset's selected_neurons() (or range(N) for a batch "
                             "whose neuron_index holds positions)")
        return host["item_index"].numpy() * len(ids) + pos, len(ids)

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in
                   (self.stims, self.values, self.offsets, self.repeats, self.lengths,
                    self.item_index, self.neuron_index, self.stim_lengths))


_INDEX_KEYS = ("offsets", "repeats", "lengths", "item_index", "neuron_index")


def _sum_dtype(counts: torch.dtype, repeats: int, into: torch.dtype | None = None) -> torch.dtype | None:
    """The narrowest integer dtype that holds the sum of ``repeats`` counts of dtype ``counts``
    exactly, for the small signed and unsigned counts torch adds in place into a wider integer
    (uint8, int8, int16); None otherwise (summed in the output's floating dtype), and None too when
    the floating dtype ``into`` holds every such sum exactly."""
    if counts not in (torch.uint8, torch.int8, torch.int16):
        return None
    largest = repeats * max(abs(torch.iinfo(counts).max), abs(torch.iinfo(counts).min))
    if into is not None and into.is_floating_point and largest <= 2 / torch.finfo(into).eps:  # 2**24 in float32
        return None
    return next(t for t in (torch.int16, torch.int32, torch.int64) if largest <= torch.iinfo(t).max)


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
    check_stim_batch([it["stims"] for it in batch], [it.get("stim_meta") for it in batch])
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
