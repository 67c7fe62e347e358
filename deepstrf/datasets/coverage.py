"""Which (stim, neuron) pairs hold data, without an S x N grid.

A concatenation is block-diagonal: source ``k``'s stims only ever have data
for source ``k``'s neurons. :class:`Coverage` stores one block per source
(its stim and neuron ranges) and, per block, either nothing (every pair of
the block was recorded: the common case) or the block's own dense mask. Every
query costs O(S + N + bits of the partial blocks it touches), so a pool of
10^4 sessions answers ``len``, selections and item masks without building
the dense ``(S, N)`` mask that ``nrn_masks`` is.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

MAX_DENSE_BYTES = 256 << 20
"""Largest dense mask :meth:`Coverage.to_dense` (and so ``nrn_masks``) builds: 256 MiB (one byte per pair)."""


class CoverageTooLargeError(MemoryError):
    """A dense coverage mask would exceed :data:`MAX_DENSE_BYTES`."""


def _mask_array(mask: np.ndarray | torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(mask.numpy() if isinstance(mask, torch.Tensor) else mask, dtype=bool)


class Coverage:
    """Block-diagonal validity of an ``(S, N)`` dataset.

    ``stim_offsets`` / ``neuron_offsets`` (K + 1 each) bound the blocks;
    ``masks[k]`` is block ``k``'s ``(S_k, N_k)`` bool mask, or None when
    every pair of the block holds data. Pairs outside every block never do.
    """

    def __init__(self, stim_offsets: Sequence[int], neuron_offsets: Sequence[int],
                 masks: Sequence[np.ndarray | None]) -> None:
        self.stim_offsets = np.asarray(stim_offsets, dtype=np.int64)
        self.neuron_offsets = np.asarray(neuron_offsets, dtype=np.int64)
        self.masks = [None if m is None else _mask_array(m) for m in masks]
        K = len(self.masks)
        if len(self.stim_offsets) != K + 1 or len(self.neuron_offsets) != K + 1:
            raise ValueError(f"coverage: {K} blocks need {K + 1} stim and neuron offsets, got "
                             f"{len(self.stim_offsets)} and {len(self.neuron_offsets)}")
        heights, widths = np.diff(self.stim_offsets), np.diff(self.neuron_offsets)
        for k, m in enumerate(self.masks):
            if m is not None and m.shape != (heights[k], widths[k]):
                raise ValueError(f"coverage: block {k}'s mask has shape {m.shape}, "
                                 f"expected {(int(heights[k]), int(widths[k]))}")
        self._stim_block = np.repeat(np.arange(K), np.diff(self.stim_offsets))
        self._neuron_block = np.repeat(np.arange(K), np.diff(self.neuron_offsets))
        self._partial = [k for k, m in enumerate(self.masks) if m is not None]

    # -- construction ---------------------------------------------------------------
    @classmethod
    def dense(cls, mask: np.ndarray | torch.Tensor) -> "Coverage":
        """One block spanning the whole ``(S, N)`` mask."""
        m = _mask_array(mask)
        return cls([0, m.shape[0]], [0, m.shape[1]], [None if m.all() and m.size else m])

    @classmethod
    def block_diagonal(cls, parts: Sequence["Coverage"]) -> "Coverage":
        """The block-diagonal concatenation of ``parts`` (their blocks, shifted)."""
        stim, neuron, masks = [0], [0], []
        for p in parts:
            stim.extend((p.stim_offsets[1:] + stim[-1]).tolist())
            neuron.extend((p.neuron_offsets[1:] + neuron[-1]).tolist())
            masks.extend(p.masks)
        return cls(stim, neuron, masks)

    # -- shape and blocks -----------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return int(self.stim_offsets[-1]), int(self.neuron_offsets[-1])

    @property
    def n_blocks(self) -> int:
        return len(self.masks)

    def block(self, k: int) -> tuple[range, range]:
        """Stim and neuron ranges of block ``k``."""
        s, n = self.stim_offsets, self.neuron_offsets
        return range(int(s[k]), int(s[k + 1])), range(int(n[k]), int(n[k + 1]))

    def block_mask(self, k: int) -> np.ndarray:
        """Block ``k``'s ``(S_k, N_k)`` mask (all True for a full block)."""
        if self.masks[k] is not None:
            return self.masks[k]
        stims, neurons = self.block(k)
        return np.ones((len(stims), len(neurons)), dtype=bool)

    def block_of_stim(self, s: int) -> int:
        return int(self._stim_block[s])

    # -- counts ---------------------------------------------------------------------
    def stim_counts(self) -> np.ndarray:
        """Number of neurons with data, per stim."""
        return self._counts(per_stim=True)

    def neuron_counts(self) -> np.ndarray:
        """Number of stims with data, per neuron."""
        return self._counts(per_stim=False)

    def _counts(self, per_stim: bool) -> np.ndarray:
        """A full block's size across, or a partial block's mask summed across, per row (column)."""
        own_block, other_offsets = ((self._stim_block, self.neuron_offsets) if per_stim
                                    else (self._neuron_block, self.stim_offsets))
        out = np.diff(other_offsets)[own_block]
        for k in self._partial:
            own = self.block(k)[0 if per_stim else 1]
            out[own.start:own.stop] = self.masks[k].sum(axis=1 if per_stim else 0)
        return out

    def count(self) -> int:
        """Number of pairs with data."""
        return int(self.stim_counts().sum())

    def fraction(self) -> float:
        """Share of the ``S x N`` pairs that hold data (0 for an empty shape)."""
        S, N = self.shape
        return self.count() / (S * N) if S * N else 0.0

    # -- queries --------------------------------------------------------------------
    def row(self, s: int) -> np.ndarray:
        """Global indices of the neurons with data for stim ``s``."""
        k = self.block_of_stim(s)
        stims, neurons = self.block(k)
        if self.masks[k] is None:
            return np.arange(neurons.start, neurons.stop)
        return np.flatnonzero(self.masks[k][s - stims.start]) + neurons.start

    def column(self, n: int) -> np.ndarray:
        """Global indices of the stims with data for neuron ``n``."""
        k = int(self._neuron_block[n])
        stims, neurons = self.block(k)
        if self.masks[k] is None:
            return np.arange(stims.start, stims.stop)
        return np.flatnonzero(self.masks[k][:, n - neurons.start]) + stims.start

    def cells(self, stims: Sequence[int], neurons: Sequence[int]) -> np.ndarray:
        """``(len(stims), len(neurons))`` bool: which of these pairs hold data."""
        stims, neurons = np.asarray(stims, dtype=np.int64), np.asarray(neurons, dtype=np.int64)
        out = np.zeros((len(stims), len(neurons)), dtype=bool)
        if not len(stims) or not len(neurons):
            return out
        sb, nb = self._stim_block[stims], self._neuron_block[neurons]
        for i, k in enumerate(sb.tolist()):
            same = nb == k
            if self.masks[k] is None:
                out[i] = same
            elif same.any():
                local = self.masks[k][stims[i] - self.stim_offsets[k]]
                out[i, same] = local[neurons[same] - self.neuron_offsets[k]]
        return out

    def stims_with_data(self, neurons: np.ndarray | None = None) -> np.ndarray:
        """``(S,)`` bool: stims with data for at least one neuron of the ``(N,)`` bool ``neurons``
        (all neurons when None)."""
        return self._with_data(neurons, per_stim=True)

    def neurons_with_data(self, stims: np.ndarray | None = None) -> np.ndarray:
        """``(N,)`` bool: neurons with data for at least one stim of the ``(S,)`` bool ``stims``
        (all stims when None)."""
        return self._with_data(stims, per_stim=False)

    def _with_data(self, selected: np.ndarray | None, per_stim: bool) -> np.ndarray:
        """Per stim (or per neuron): any pair with data among the ``selected`` of the other axis.
        Full blocks answer from a cumulative sum; partial ones from their masks."""
        if selected is None:
            return (self.stim_counts() if per_stim else self.neuron_counts()) > 0
        own_block, other_offsets = ((self._stim_block, self.neuron_offsets) if per_stim
                                    else (self._neuron_block, self.stim_offsets))
        out = _any_per_block(selected, other_offsets)[own_block]
        for k in self._partial:
            stims, neurons = self.block(k)
            own, other = (stims, neurons) if per_stim else (neurons, stims)
            mask = self.masks[k] if per_stim else self.masks[k].T
            out[own.start:own.stop] = mask[:, selected[other.start:other.stop]].any(axis=1)
        return out

    # -- dense ----------------------------------------------------------------------
    def dense_bytes(self, stims: Sequence[int] | None = None, neurons: Sequence[int] | None = None) -> int:
        S, N = self.shape
        return (S if stims is None else len(stims)) * (N if neurons is None else len(neurons))

    def to_dense(self, stims: Sequence[int] | slice | None = None,
                 neurons: Sequence[int] | slice | None = None) -> torch.Tensor:
        """Dense bool tensor of a window (all stims / neurons by default).

        Raises :class:`CoverageTooLargeError` above :data:`MAX_DENSE_BYTES`.
        """
        S, N = self.shape
        stims = _indices(stims, S)
        neurons = _indices(neurons, N)
        size = len(stims) * len(neurons)
        if size > MAX_DENSE_BYTES:
            raise CoverageTooLargeError(
                f"a dense coverage mask of {len(stims)} stims x {len(neurons)} neurons would take "
                f"{_human(size)}, above the {_human(MAX_DENSE_BYTES)} limit "
                "(deepstrf.datasets.coverage.MAX_DENSE_BYTES). Query ds.coverage instead: its blocks "
                "(block, block_mask), counts, row(s)/column(n), cells(stims, neurons), or "
                "to_dense(stims, neurons) of a smaller window.")
        if stims.size and neurons.size and (np.diff(stims) == 1).all() and (np.diff(neurons) == 1).all():
            return torch.from_numpy(self._window(int(stims[0]), int(stims[-1]) + 1,
                                                 int(neurons[0]), int(neurons[-1]) + 1))
        return torch.from_numpy(self.cells(stims, neurons))

    def _window(self, s0: int, s1: int, n0: int, n1: int) -> np.ndarray:
        """Contiguous window: each overlapping block pasted in."""
        out = np.zeros((s1 - s0, n1 - n0), dtype=bool)
        first, last = self._stim_block[s0], self._stim_block[s1 - 1]
        for k in range(int(first), int(last) + 1):
            stims, neurons = self.block(k)
            a, b = max(stims.start, s0), min(stims.stop, s1)
            c, d = max(neurons.start, n0), min(neurons.stop, n1)
            if a >= b or c >= d:
                continue
            block = self.masks[k]
            out[a - s0:b - s0, c - n0:d - n0] = True if block is None else \
                block[a - stims.start:b - stims.start, c - neurons.start:d - neurons.start]
        return out

    def __repr__(self) -> str:
        S, N = self.shape
        return (f"Coverage(S={S}, N={N}, blocks={self.n_blocks}, partial={len(self._partial)}, "
                f"pairs={self.count()})")


def _indices(sel: Sequence[int] | slice | None, size: int) -> np.ndarray:
    if sel is None:
        return np.arange(size)
    if isinstance(sel, slice):
        return np.arange(size)[sel]
    return np.asarray(sel, dtype=np.int64).reshape(-1)


def _any_per_block(selected: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per block: does ``selected`` (bool over one axis) hold a True inside the block's range?"""
    total = np.concatenate([[0], np.cumsum(selected, dtype=np.int64)])
    return total[offsets[1:]] > total[offsets[:-1]]


def _human(nbytes: float) -> str:
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024:
            break
        nbytes /= 1024
    return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
