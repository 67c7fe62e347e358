"""The deepSTRF-compatible data model: ``NeuralDataset``.

A dataset is S stimuli x N neurons of ragged spike-count responses:
``stims[s]`` a tensor whose last axis is time, ``responses[s][n]`` an
``(R, T_s)`` float tensor or the ``(1, 1)`` NaN sentinel for a pair that was
never recorded. ``stims`` and ``responses`` may be plain lists (as deepSTRF
subclasses fill them) or lazy views (concatenations, store-backed datasets);
every method here works through :mod:`deepstrf.datasets.views` and so
answers the same way for both.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import IncompatibleDatasetsError
from . import views
from .coverage import Coverage
from .metatable import matching_attr
from .smoothing import hanning_bins, hanning_smooth


class DatasetValidationError(AssertionError, ValueError):
    """A dataset's attributes are inconsistent (raised by ``validate``)."""


class SelectionError(AssertionError, IndexError):
    """A stim or neuron index given to a ``select_*`` method is out of range."""


def _check(cond: bool, message: str, exc: type[Exception] = DatasetValidationError) -> None:
    if not cond:
        raise exc(message)


class NeuralDataset(Dataset):
    """Base class of datasets of sensory neural responses (deepSTRF contract).

    A subclass sets ``stims``, ``responses``, ``stim_meta``, ``nrn_meta`` and
    ``N_neurons`` in its ``__init__`` and then calls :meth:`validate`.
    ``coverage`` (block-sparse) and ``nrn_masks`` (its dense form) are
    derived from ``responses`` and cached; call :meth:`_invalidate_nrn_masks`
    after replacing cells by hand.
    """

    def __init__(self, path: str, dt_ms: float):
        super().__init__()
        self.path = path
        self.dt = dt_ms
        self.responses: Any = []
        self.stims: Any = []
        self.stim_meta: list[dict] = []
        self.nrn_meta: list[dict] = []
        self.N_neurons = 0
        self._masks: torch.Tensor | None = None
        self._coverage_cache: Coverage | None = None
        self._iter_cache: tuple | None = None
        self._I: list[int] = []
        self._S_sel: list[int] | None = None

    # -- attributes and aliases ------------------------------------------------
    @property
    def dt_ms(self) -> float:
        """Bin width in ms (alias of ``dt``, the deepSTRF attribute name)."""
        return self.dt

    @dt_ms.setter
    def dt_ms(self, value: float) -> None:
        self.dt = value

    @property
    def neuron_metadata(self) -> list[dict]:
        """Older name of ``nrn_meta``."""
        return self.nrn_meta

    @neuron_metadata.setter
    def neuron_metadata(self, value: list[dict]) -> None:
        self.nrn_meta = value

    @property
    def I(self) -> list[int]:  # noqa: E743 - deepSTRF's name for the neuron selection
        """Selected neuron indices; ``[]`` means all neurons."""
        return self._I

    @I.setter
    def I(self, value: Sequence[int]) -> None:  # noqa: E743
        self._I = list(value)
        self._iter_cache = None

    @property
    def S_sel(self) -> list[int] | None:
        """Selected stim indices; ``None`` means all stims, ``[]`` means none."""
        return self._S_sel

    @S_sel.setter
    def S_sel(self, value: Sequence[int] | None) -> None:
        self._S_sel = None if value is None else list(value)
        self._iter_cache = None

    def get_N(self) -> int:
        """Total number of neurons (not the selection)."""
        return self.N_neurons

    def get_S(self) -> int:
        """Total number of stimuli."""
        return len(self.stim_meta)

    def get_nrn_meta(self) -> list[dict]:
        """Metadata of the neurons in ``I``."""
        return [self.nrn_meta[i] for i in self.I]

    # -- masks -------------------------------------------------------------
    @property
    def coverage(self) -> Coverage:
        """Which (stim, neuron) pairs have data, per source block, without an S x N grid
        (see :class:`~deepstrf.datasets.coverage.Coverage`). A subclass that overrides
        :meth:`_compute_nrn_masks` (deepSTRF's hook) decides it: coverage is then its mask."""
        if getattr(self, "_coverage_cache", None) is None:
            masks_overridden = type(self)._compute_nrn_masks is not NeuralDataset._compute_nrn_masks
            if masks_overridden and not vars(self).get("_asking_override"):
                self._asking_override = True  # an override that reads coverage gets the responses'
                try:
                    coverage = Coverage.dense(self.nrn_masks)
                finally:
                    self._asking_override = False
            else:
                coverage = self._responses_coverage()
            self._coverage_cache = coverage
        return self._coverage_cache

    def _responses_coverage(self) -> Coverage:
        """Coverage as ``responses`` holds it (every non-missing cell)."""
        if isinstance(self.responses, views.ResponseGrid):
            return self.responses.coverage()
        if len(self.responses) == 0:
            return Coverage.dense(np.zeros((0, self.N_neurons), dtype=bool))
        return Coverage.dense(views.grid_mask(self.responses, self.N_neurons))

    @property
    def nrn_masks(self) -> torch.Tensor:
        """``(S, N)`` bool tensor, True where the (stim, neuron) pair has data.

        Built from :attr:`coverage`; above ``coverage.MAX_DENSE_BYTES`` (256 MiB)
        it raises ``CoverageTooLargeError``: query :attr:`coverage` instead.
        """
        if self._nrn_masks_cache is None:
            self._nrn_masks_cache = self._compute_nrn_masks()
        return self._nrn_masks_cache

    @property
    def _nrn_masks_cache(self) -> torch.Tensor | None:
        return getattr(self, "_masks", None)

    @_nrn_masks_cache.setter
    def _nrn_masks_cache(self, value: torch.Tensor | None) -> None:
        # deepSTRF code resets the masks by assigning None here: the other caches follow
        self._masks = value
        if value is None:
            self._coverage_cache = None
            self._iter_cache = None
            grid = vars(self).get("responses")
            # the copies an in-memory concatenation keeps of its in-memory sources share their cells
            # (a store's pool holds its sources as a lazy sequence: none of them is in memory)
            if isinstance(grid, views.BlockDiagonalGrid) and isinstance(grid.sources, list):
                for part in grid.sources:
                    if isinstance(vars(part).get("responses"), list):
                        part._nrn_masks_cache = None

    def _compute_nrn_masks(self) -> torch.Tensor:
        """The dense mask of the pairs ``responses`` holds data for. A subclass may override it
        (as in deepSTRF, e.g. to count too few repeats as missing): :attr:`coverage`, ``len``,
        items and selections then follow the override."""
        if type(self)._compute_nrn_masks is NeuralDataset._compute_nrn_masks:
            return self.coverage.to_dense()  # the responses' coverage, cached
        return self._responses_coverage().to_dense()  # asked by an override: coverage would ask it back

    def _invalidate_nrn_masks(self) -> None:
        """Forget the cached ``coverage`` and ``nrn_masks``; the next access recomputes them."""
        self._nrn_masks_cache = None

    # -- selection ---------------------------------------------------------
    def _selected_stims(self) -> list[int]:
        """Effective stim selection (all stims when ``S_sel`` is None)."""
        if self.S_sel is None:
            return list(range(self.get_S()))
        return list(self.S_sel)

    def _selected(self) -> list[int]:
        """Effective neuron selection.

        ``I`` (or all neurons), minus neurons without a valid response in the
        stim selection when one is set.
        """
        base = list(self.I) if self.I else list(range(self.N_neurons))
        if self.S_sel is None:
            return base
        stims = self._selected_stims()
        if not stims or self.get_S() == 0 or not base:
            return []
        keep = self.coverage.neurons_with_data(_flags(stims, self.get_S()))
        return [n for n in base if keep[n]]

    @property
    def _iter_idx(self) -> list[int]:
        """Stims visible to ``len`` / ``ds[i]``: in the stim selection and with
        at least one valid response among the selected neurons."""
        coverage = self.coverage
        # I and S_sel are plain lists that deepSTRF code also edits in place (ds.I.append(n)):
        # the cache holds what they were, not only whether they were reassigned
        key = (id(coverage), list(self._I), None if self._S_sel is None else list(self._S_sel))
        if self._iter_cache is not None and self._iter_cache[0] == key:
            return self._iter_cache[1]
        idx: list[int] = []
        selected = self._selected()
        if self.get_S() and selected:
            everyone = not self.I and self.S_sel is None
            visible = coverage.stims_with_data(None if everyone else _flags(selected, self.N_neurons))
            if self.S_sel is not None:
                visible &= _flags(self.S_sel, self.get_S())
            idx = np.flatnonzero(visible).tolist()
        self._iter_cache = (key, idx)
        return idx

    def selected_neurons(self) -> list[int]:
        """Global indices of the neurons that items expose, in item order."""
        return self._selected()

    def visible_stims(self) -> list[int]:
        """Global stim indices that ``len`` and ``ds[i]`` expose, in order."""
        return list(self._iter_idx)

    def _check_neuron(self, n: Any) -> None:
        _check(isinstance(n, int) and 0 <= n < self.N_neurons,
               f"neuron_index must be in [0, {self.N_neurons}), got {n!r}", SelectionError)

    def _check_stim(self, s: Any) -> None:
        _check(isinstance(s, int) and 0 <= s < self.get_S(),
               f"stim_index must be in [0, {self.get_S()}), got {s!r}", SelectionError)

    def select_neuron(self, neuron_index: int) -> None:
        """Restrict the neuron selection to one neuron."""
        self._check_neuron(neuron_index)
        self.I = [neuron_index]

    def select_population(self, neuron_indices: Sequence[int]) -> None:
        """Restrict the neuron selection to ``neuron_indices`` (``[]`` = all)."""
        for n in neuron_indices:
            self._check_neuron(n)
        self.I = list(neuron_indices)

    def reset_pop_selection(self) -> None:
        """Select all neurons again."""
        self.I = []

    def select_pop_by_nrn_attr(self, attribute_name: str, value: Any) -> list[int]:
        """Select neurons whose ``nrn_meta[attribute_name] == value``; a neuron
        without the key does not match."""
        fast = matching_attr(self.nrn_meta, attribute_name, value)
        if fast is None:
            return self.select_pop_by_nrn_predicate(lambda m: m[attribute_name] == value)
        self.I = fast
        return self.I

    def select_pop_by_nrn_predicate(self, predicate: Callable[[dict], Any]) -> list[int]:
        """Select neurons whose metadata satisfies ``predicate``; a neuron on
        which it raises ``KeyError`` or ``TypeError`` is skipped."""
        self.I = _matching(self.nrn_meta, predicate)
        return self.I

    def select_pop_by_stim_attr(self, attribute_name: str, value: Any) -> list[int]:
        """Select neurons with a valid response to a stim whose
        ``stim_meta[attribute_name] == value``."""
        return self.select_pop_by_stim_predicate(lambda m: m[attribute_name] == value)

    def select_pop_by_stim_predicate(self, predicate: Callable[[dict], Any]) -> list[int]:
        """Select neurons with a valid response to a stim matching ``predicate``."""
        stims = _matching(self.stim_meta, predicate)
        if not stims:
            self.I = []
            return []
        self.I = np.flatnonzero(self.coverage.neurons_with_data(_flags(stims, self.get_S()))).tolist()
        return self.I

    def select_stim(self, stim_index: int) -> None:
        """Restrict iteration to one stimulus."""
        self._check_stim(stim_index)
        self.S_sel = [stim_index]

    def select_stims(self, stim_indices: Sequence[int]) -> None:
        """Restrict iteration to the listed stimuli."""
        for s in stim_indices:
            self._check_stim(s)
        self.S_sel = list(stim_indices)

    def select_stims_by_attr(self, attribute_name: str, value: Any) -> list[int]:
        """Restrict iteration to stims whose ``stim_meta[attribute_name] == value``."""
        fast = matching_attr(self.stim_meta, attribute_name, value)
        if fast is None:
            return self.select_stims_by_predicate(lambda m: m[attribute_name] == value)
        self.S_sel = fast
        return self.S_sel

    def select_stims_by_predicate(self, predicate: Callable[[dict], Any]) -> list[int]:
        """Restrict iteration to stims whose metadata satisfies ``predicate``."""
        self.S_sel = _matching(self.stim_meta, predicate)
        return self.S_sel

    def reset_stim_selection(self) -> None:
        """Make every stimulus eligible again."""
        self.S_sel = None

    # -- iteration -----------------------------------------------------------
    def __len__(self) -> int:
        return len(self._iter_idx)

    def __getitem__(self, idx):
        """Item(s) over visible stims: ``{"stims", "responses", "valid_mask", "stim_meta"}``."""
        iter_idx = self._iter_idx
        if isinstance(idx, bool) or not isinstance(idx, (int, slice, list, tuple)):
            raise TypeError(f"Invalid index type {type(idx).__name__}: use an int, a slice or a list of ints")
        if isinstance(idx, int):
            n = len(iter_idx)
            i = idx + n if idx < 0 else idx
            if not 0 <= i < n:
                raise IndexError(f"Dataset index {idx} out of range (len={n} under current selection)")
            return self._item(iter_idx[i], self._selected())
        if isinstance(idx, slice):
            stims = [iter_idx[i] for i in range(*idx.indices(len(iter_idx)))]
        else:
            stims = [iter_idx[i] for i in idx]
        selected = self._selected()
        items = [self._item(s, selected) for s in stims]
        return {k: [it[k] for it in items] for k in ("stims", "responses", "valid_mask", "stim_meta")}

    def _item(self, s: int, selected: list[int]) -> dict:
        return {
            "stims": self.stims[s],
            "responses": views.read_row(self.responses, s, selected),
            "valid_mask": torch.from_numpy(self.coverage.cells([s], selected)[0]),
            "stim_meta": self.stim_meta[s],
        }

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(N_neurons={self.get_N()}, selected={len(self.I)}, "
                f"N_stims={self.get_S()}, dt_ms={self.dt})")

    __str__ = __repr__

    # -- transforms ------------------------------------------------------------
    def smooth_responses(self, window_ms: float = 21.0) -> None:
        """Smooth every valid response with a Hanning window of ``window_ms``."""
        dt = self.dt
        hanning_bins(window_ms, dt)  # a bad window is refused now, not where a lazy dataset is read
        smooth = views.DescribedTransform(lambda r, s, n: hanning_smooth(r, window_ms=window_ms, dt_ms=dt),
                                          f"smooth_responses(window_ms={window_ms!r}, dt_ms={dt!r})")
        self.responses = views.map_responses(self.responses, smooth, self.N_neurons)

    def normalize_responses(self, method: str = "max",
                            stim_indices: Sequence[int] | None = None,
                            eps: float = 1e-8) -> dict:
        """Per-neuron normalisation of responses, statistics from ``stim_indices``.

        ``"max"`` divides by the largest absolute value, ``"zscore"`` subtracts
        the mean and divides by the standard deviation. Statistics are taken
        in one streaming pass over the valid cells; the transform is applied
        in place (lists) or on read (views).
        """
        if method not in ("max", "zscore"):
            raise ValueError(f"method must be 'max' or 'zscore', got {method!r}")
        N = self.N_neurons
        peak = torch.zeros(N, dtype=torch.float64)
        total = torch.zeros(N, dtype=torch.float64)
        total_sq = torch.zeros(N, dtype=torch.float64)
        count = torch.zeros(N, dtype=torch.float64)
        stims = range(self.get_S()) if stim_indices is None else stim_indices
        for s, neurons, cells in self._stream_valid_cells(stims):
            for n, r in zip(neurons, cells):
                x = r.double()
                peak[n] = max(float(peak[n]), float(x.abs().max()))
                total[n] += x.sum()
                total_sq[n] += (x * x).sum()
                count[n] += x.numel()
        offset = torch.zeros(N)
        scale = torch.ones(N)
        enough = count >= 2
        if method == "max":
            scale = torch.where(enough, peak.clamp(min=eps), 1.0).float()
        else:
            mean = total / count.clamp(min=1)
            var = (total_sq - count * mean * mean) / (count - 1).clamp(min=1)
            offset = torch.where(enough, mean, 0.0).float()
            scale = torch.where(enough, var.clamp(min=0).sqrt().clamp(min=eps), 1.0).float()
        off_c, scale_c = offset.clone(), scale.clone()
        digest = hashlib.sha1(off_c.numpy().tobytes() + scale_c.numpy().tobytes()).hexdigest()
        normalize = views.DescribedTransform(lambda r, s, n: (r - off_c[n]) / scale_c[n],
                                             f"normalize_responses(offset, scale: sha1 {digest})")
        self.responses = views.map_responses(self.responses, normalize, N)
        self.response_normalization = {
            "method": method, "scale": scale, "offset": offset,
            "stim_indices": None if stim_indices is None else list(stim_indices),
        }
        return self.response_normalization

    def standardize_stims(self, stim_indices: Sequence[int] | None = None,
                          per_band: bool = True, eps: float = 1e-8) -> dict:
        """Standardise stimuli with statistics from ``stim_indices`` (all by default).

        ``per_band`` keeps one mean/std per frequency band (axis -2). The result has the
        stimuli's dtype if it is floating, else float32 (e.g. uint8 video frames).
        Statistics come from one streaming pass; the transform is applied to
        every stimulus, eagerly for lists and on read for lazy views.
        """
        indices = list(range(len(self.stims))) if stim_indices is None else list(stim_indices)
        if not indices:
            raise ValueError("standardize_stims: no stims to compute statistics from")
        total = total_sq = None
        count = 0
        for i in indices:
            x = self.stims[i].double()
            dims = tuple(d for d in range(x.dim()) if d != x.dim() - 2) if per_band else tuple(range(x.dim()))
            part, part_sq = x.sum(dim=dims, keepdim=per_band), (x * x).sum(dim=dims, keepdim=per_band)
            total = part if total is None else total + part
            total_sq = part_sq if total_sq is None else total_sq + part_sq
            count += x.numel() // (x.shape[-2] if per_band else 1)
        mean = total / count
        var = (total_sq - count * mean * mean) / max(count - 1, 1)
        std = var.clamp(min=0).sqrt().clamp(min=eps)
        dtype = self.stims[indices[0]].dtype
        if not dtype.is_floating_point:  # integer frames (uint8 video): in their dtype, x - mean wraps around
            dtype = torch.float32
        mean, std = mean.to(dtype), std.to(dtype)
        self.stims = views.map_stims(self.stims, lambda x, i: (x.to(dtype) - mean) / std)
        self.stim_normalization = {
            "mean": mean.clone(), "std": std.clone(), "per_band": per_band,
            "stim_indices": None if stim_indices is None else list(stim_indices),
        }
        return self.stim_normalization

    @torch.no_grad()
    def compute_neuron_quality(self, max_ccmax_iters: int = 126) -> dict:
        """Add ``"snr"`` (Sahani-Linden) and ``"ccmax"`` (Hsu split-half ceiling)
        to every ``nrn_meta`` dict, length-weighted across stims.

        Streams one stim at a time. ``ccmax`` is 1.0 for a neuron that never
        has 2 repeats (no correction possible) and NaN when every split-half
        correlation is <= 0.
        """
        from ..metrics.quality import signal_noise_power, split_half_ceiling

        N = self.N_neurons
        w_sp = torch.zeros(N, dtype=torch.float64)
        sum_sp = torch.zeros(N, dtype=torch.float64)
        sum_np = torch.zeros(N, dtype=torch.float64)
        w_cc = torch.zeros(N, dtype=torch.float64)
        sum_cc = torch.zeros(N, dtype=torch.float64)
        has_repeats = torch.zeros(N, dtype=torch.bool)
        for s, neurons, cells in self._stream_valid_cells(range(self.get_S())):
            for n, r in zip(neurons, cells):
                T = r.shape[-1]
                has_repeats[n] |= r.shape[0] >= 2
                power = signal_noise_power(r)
                if power is not None:
                    w_sp[n] += T
                    sum_sp[n] += T * power[0]
                    sum_np[n] += T * power[1]
                cc = split_half_ceiling(r, max_ccmax_iters)
                if cc is not None:
                    w_cc[n] += T
                    sum_cc[n] += T * cc
        nan = torch.full((N,), math.nan, dtype=torch.float64)
        sp = torch.where(w_sp > 0, sum_sp / w_sp.clamp(min=1), nan)
        noise = torch.where(w_sp > 0, sum_np / w_sp.clamp(min=1), nan)
        snr = (sp / noise.clamp(min=1e-12)).float()
        ccmax = torch.where(w_cc > 0, sum_cc / w_cc.clamp(min=1), nan)
        ccmax = torch.where(torch.isnan(ccmax) & ~has_repeats, 1.0, ccmax).float()
        for i in range(N):
            self.nrn_meta[i]["snr"] = float(snr[i])
            self.nrn_meta[i]["ccmax"] = float(ccmax[i])
        return {"snr": snr, "ccmax": ccmax}

    def _stream_valid_cells(self, stims: Sequence[int]):
        """Yield ``(s, neurons, cells)`` with the valid cells of each stim, one stim at a time."""
        coverage = self.coverage
        for s in stims:
            neurons = coverage.row(s).tolist()
            if neurons:
                yield s, neurons, views.read_row(self.responses, s, neurons)

    def to_memory(self) -> "NeuralDataset":
        """A copy whose ``stims`` and ``responses`` are plain lists of tensors
        (what a deepSTRF loader builds); reads everything once."""
        out = type(self).__new__(type(self))
        out.__dict__.update(self.__dict__)
        out.stims = [self.stims[s] for s in range(self.get_S())]
        out.responses = [views.read_row(self.responses, s, range(self.N_neurons)) for s in range(self.get_S())]
        out.stim_meta = [dict(m) for m in self.stim_meta]
        out.nrn_meta = [dict(m) for m in self.nrn_meta]
        out._invalidate_nrn_masks()
        return out

    # -- concatenation -----------------------------------------------------------
    def __add__(self, other):
        if not isinstance(other, NeuralDataset):
            return NotImplemented
        from .concat import concat_datasets

        return concat_datasets([self, other])

    def _concat_check_compat(self, other: "NeuralDataset", names: tuple[str, str] | None = None) -> None:
        """Raise :class:`IncompatibleDatasetsError` if ``other`` cannot be
        concatenated with ``self``. Subclasses extend it (F, frame size)."""
        a, b = names or (type(self).__name__, type(other).__name__)
        if self.dt != other.dt:
            raise IncompatibleDatasetsError(
                f"dt mismatch: {a} has dt_ms={self.dt}, {b} has dt_ms={other.dt}. "
                "Re-bin the responses to a common bin width first "
                "(deepstrf.datasets.resample.rebin_dataset); nothing is resampled automatically.")

    def _concat_copy_attrs(self, source: "NeuralDataset") -> None:
        """Copy modality attributes (F, H, W, ...) from ``source``; base has none."""

    def summary(self) -> dict:
        """Plain-dict description: kind, sizes, coverage and per-source blocks."""
        out = {
            "kind": type(self).__name__,
            "S": self.get_S(),
            "N": self.N_neurons,
            "dt_ms": self.dt,
            "coverage": self.coverage.fraction(),
            "visible_items": len(self),
            "sources": [
                {"name": name, "stims": [s.start, s.stop], "neurons": [n.start, n.stop]}
                for name, s, n in self.source_blocks()
            ],
        }
        dups = getattr(self, "duplicate_uids", None)
        if dups and (dups["stim"] or dups["neuron"]):
            out["duplicate_uids"] = dups
        return out

    def source_blocks(self) -> list[tuple[str, range, range]]:
        """``(name, stim range, neuron range)`` per source; one block for a plain dataset."""
        names = getattr(self, "source_names", None)
        if isinstance(self.responses, views.BlockDiagonalGrid) and names:
            g = self.responses
            return [(name, range(g.stim_offsets[k], g.stim_offsets[k + 1]),
                     range(g.neuron_offsets[k], g.neuron_offsets[k + 1]))
                    for k, name in enumerate(names)]
        return [(getattr(self, "name", None) or type(self).__name__,
                 range(self.get_S()), range(self.N_neurons))]

    # -- validation --------------------------------------------------------------
    def validate(self, *, deep: bool | None = None) -> None:
        """Check the attributes are consistent; raise a clear error if not.

        ``deep`` also checks every cell's shape (default: only for plain-list
        responses, since a lazy view would have to read everything).
        """
        _check(isinstance(self.path, str), f"self.path must be a str (got {type(self.path).__name__})")
        _check(isinstance(self.dt, (int, float)) and not isinstance(self.dt, bool) and self.dt > 0,
               f"self.dt must be a positive number (got {self.dt!r})")
        _check(isinstance(self.N_neurons, int) and self.N_neurons > 0,
               f"self.N_neurons must be a positive int (got {self.N_neurons!r})")
        S = len(self.stim_meta)
        _check(S > 0, "self.stim_meta must be non-empty")
        _check(len(self.stims) == S, f"len(self.stims) ({len(self.stims)}) must equal len(self.stim_meta) ({S})")
        _check(len(self.responses) == S,
               f"len(self.responses) ({len(self.responses)}) must equal len(self.stim_meta) ({S})")
        _check(len(self.nrn_meta) == self.N_neurons,
               f"len(self.nrn_meta) ({len(self.nrn_meta)}) must equal self.N_neurons ({self.N_neurons})")
        if deep is None:
            deep = isinstance(self.responses, list)
        if deep:
            self._validate_cells()

    def _validate_cells(self) -> None:
        for s in range(len(self.responses)):
            check_row(self.responses[s], s, self.N_neurons)


def check_row(row: Sequence[Any], s: int, n_neurons: int) -> None:
    """Refuse row ``responses[s]`` of a list grid unless it holds ``n_neurons`` 2-D ``(R, T)`` tensors."""
    _check(len(row) == n_neurons, f"responses[{s}] has {len(row)} entries, expected N_neurons={n_neurons}")
    for n in range(n_neurons):
        r = row[n]
        _check(isinstance(r, torch.Tensor) and r.dim() == 2,
               f"responses[{s}][{n}] must be a 2-D (R, T) tensor (got {_shape_of(r)})")


def _shape_of(x: Any) -> str:
    """``x``'s type, and its shape where it has one, for messages."""
    shape = getattr(x, "shape", None)
    return type(x).__name__ if shape is None else f"{type(x).__name__} of shape {tuple(shape)}"


def _flags(indices: Sequence[int], size: int) -> np.ndarray:
    """``(size,)`` bool, True at ``indices``."""
    out = np.zeros(size, dtype=bool)
    out[list(indices)] = True
    return out


def _matching(metas: Sequence[dict], predicate: Callable[[dict], Any]) -> list[int]:
    """Indices of the dicts satisfying ``predicate``; KeyError/TypeError = no match."""
    out = []
    for i, m in enumerate(metas):
        try:
            if predicate(m):
                out.append(i)
        except (KeyError, TypeError):
            continue
    return out
