"""Lazy sequence and grid views behind ``stims`` and ``responses``.

A dataset's ``stims`` is a sequence of S tensors and its ``responses`` an
S x N grid (``responses[s][n]``). deepSTRF stores both as plain Python lists.
deepstrf also accepts *views*: objects that produce the tensors on access, so
that a concatenation or a store-backed dataset never materialises its grid.
The data model only relies on the small interface defined here, which plain
lists satisfy too (see :func:`read_row` and :func:`grid_mask`).
"""

from __future__ import annotations

import bisect
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..forksafe import thread_map
from .coverage import Coverage

CellTransform = Callable[[torch.Tensor, int, int], torch.Tensor]
StimTransform = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class DescribedTransform:
    """A cell transform with a stable description of what it computes (its name and parameters,
    e.g. ``"smooth_responses(window_ms=21.0, dt_ms=1.0)"``), by which rows it produced can be
    told apart from others (:meth:`ResponseGrid.content_signature`)."""

    fn: CellTransform
    signature: str

    def __call__(self, cell: torch.Tensor, s: int, n: int) -> torch.Tensor:
        return self.fn(cell, s, n)


def missing_sentinel() -> torch.Tensor:
    """The canonical missing-pair marker: a ``(1, 1)`` float tensor holding NaN."""
    return torch.full((1, 1), float("nan"))


def is_missing(cell: torch.Tensor) -> bool:
    """True if ``cell`` marks a (stim, neuron) pair without data.

    The sentinel is the ``(1, 1)`` tensor holding NaN (deepSTRF counts any ``(1, 1)`` cell);
    any other floating tensor that contains NaN is missing too (deepSTRF counts it as data).
    """
    if tuple(cell.shape) == (1, 1):
        return bool(torch.isnan(cell).all())
    return cell.is_floating_point() and bool(torch.isnan(cell).any())


def _normalise_index(i: int, size: int, what: str) -> int:
    if not isinstance(i, int):
        raise TypeError(f"{what} index must be an int, got {type(i).__name__}")
    j = i + size if i < 0 else i
    if not 0 <= j < size:
        raise IndexError(f"{what} index {i} out of range for size {size}")
    return j


@dataclass
class RawRow:
    """The valid cells of one stim, as stored: the unit of batched reads.

    ``values`` concatenates each cell's ``(repeats[i], lengths[i])`` block in
    row-major order, in the stored dtype (integer counts stay integers).
    """

    stim: int
    neurons: np.ndarray
    repeats: np.ndarray
    lengths: np.ndarray
    values: np.ndarray

    @property
    def sizes(self) -> np.ndarray:
        """Number of values of each cell (``repeats * lengths``)."""
        return self.repeats * self.lengths

    def cells(self) -> list[np.ndarray]:
        """The cells as ``(R, T)`` arrays (views into ``values``)."""
        out, start = [], 0
        for r, t in zip(self.repeats.tolist(), self.lengths.tolist()):
            out.append(self.values[start:start + r * t].reshape(r, t))
            start += r * t
        return out


def raw_row_from_cells(s: int, neurons: Sequence[int], cells: Sequence[torch.Tensor]) -> RawRow:
    """Pack the valid cells among ``cells`` (aligned with ``neurons``) into a :class:`RawRow`."""
    keep = [(n, c) for n, c in zip(neurons, cells) if not is_missing(c)]
    if not keep:
        empty = np.zeros(0, dtype=np.int64)
        return RawRow(s, empty, empty, empty, np.zeros(0, dtype=np.float32))
    return RawRow(
        stim=s,
        neurons=np.array([n for n, _ in keep], dtype=np.int64),
        repeats=np.array([c.shape[0] for _, c in keep], dtype=np.int64),
        lengths=np.array([c.shape[1] for _, c in keep], dtype=np.int64),
        values=np.concatenate([c.detach().cpu().numpy().reshape(-1) for _, c in keep]),
    )


class LazySequence(Sequence):
    """Read-only-looking sequence whose items are produced on access.

    Assignment is supported as a copy-on-write override, so user code that
    edits ``ds.stims[i]`` in place never touches the underlying source.
    """

    def __init__(self, length: int) -> None:
        self._length = length
        self._overrides: dict[int, Any] = {}

    @abstractmethod
    def _get(self, i: int) -> Any:
        """Item ``i`` (already bounds-checked and not overridden)."""

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._length))]
        j = _normalise_index(i, self._length, "stim")
        if j in self._overrides:
            return self._overrides[j]
        return self._get(j)

    def read_many(self, indices: Sequence[int]) -> list[Any]:
        """Items at ``indices`` (overrides honoured), read in one batch where the sequence can."""
        ids = [_normalise_index(i, self._length, "stim") for i in indices]
        todo = [j for j in ids if j not in self._overrides]
        got = dict(zip(todo, self._get_many(todo))) if todo else {}
        return [self._overrides[j] if j in self._overrides else got[j] for j in ids]

    def _get_many(self, indices: Sequence[int]) -> list[Any]:
        """Items at valid, non-overridden ``indices``; store-backed sequences batch the read."""
        return [self._get(i) for i in indices]

    def __setitem__(self, i: int, value: Any) -> None:
        self._overrides[_normalise_index(i, self._length, "stim")] = value

    def __iter__(self) -> Iterator:
        for i in range(self._length):
            yield self[i]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(len={self._length})"


class ConcatSequence(LazySequence):
    """The concatenation of several sequences, without copying them."""

    def __init__(self, parts: Sequence[Sequence], offsets: Sequence[int] | None = None) -> None:
        """``offsets``: where each part starts (and the total at the end), when known: the parts
        are then left as given (a lazy sequence of them is not walked)."""
        if offsets is None:
            self.parts = list(parts)
            offsets = np.cumsum([0, *(len(p) for p in self.parts)]).tolist()
        else:
            self.parts = parts
        self.offsets = list(offsets)
        super().__init__(self.offsets[-1])

    def _get(self, i: int) -> Any:
        k = bisect.bisect_right(self.offsets, i) - 1
        return self.parts[k][i - self.offsets[k]]

    def _get_many(self, indices: Sequence[int]) -> list[Any]:
        """One batched read per part (concurrently when parts wait on the network)."""
        by_part: dict[int, list[int]] = {}
        for i in indices:
            by_part.setdefault(bisect.bisect_right(self.offsets, i) - 1, []).append(i)
        reads = map_parts(lambda k: read_many(self.parts[k], [i - self.offsets[k] for i in by_part[k]]),
                          list(by_part), [self.parts[k] for k in by_part])
        got: dict[int, Any] = {}
        for k, items in zip(by_part, reads):
            got.update(zip(by_part[k], items))
        return [got[i] for i in indices]


class MappedSequence(LazySequence):
    """``fn(base[i], i)`` computed on access; used for recorded stim transforms."""

    def __init__(self, base: Sequence, fn: StimTransform) -> None:
        super().__init__(len(base))
        self.base = base
        self.fn = fn

    def _get(self, i: int) -> Any:
        return self.fn(self.base[i], i)

    def _get_many(self, indices: Sequence[int]) -> list[Any]:
        return [self.fn(x, i) for x, i in zip(read_many(self.base, indices), indices)]


class GridRow(Sequence):
    """Row ``s`` of a :class:`ResponseGrid`: ``row[n]`` reads cell ``(s, n)``."""

    __slots__ = ("grid", "s")

    def __init__(self, grid: "ResponseGrid", s: int) -> None:
        self.grid = grid
        self.s = s

    def __len__(self) -> int:
        return self.grid.n_neurons

    def __getitem__(self, n):
        if isinstance(n, slice):
            return self.grid.row(self.s, range(*n.indices(self.grid.n_neurons)))
        return self.grid.cell(self.s, _normalise_index(n, self.grid.n_neurons, "neuron"))

    def __setitem__(self, n: int, value: torch.Tensor) -> None:
        self.grid.set_cell(self.s, _normalise_index(n, self.grid.n_neurons, "neuron"), value)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.grid.row(self.s, range(self.grid.n_neurons)))

    def __add__(self, other: Sequence) -> list:  # as a list row: row + [cell]
        return list(self) + list(other)

    def __radd__(self, other: Sequence) -> list:
        return list(other) + list(self)


class ResponseGrid(Sequence):
    """An S x N grid of response tensors produced on access.

    Subclasses implement :meth:`_read_row` (raw cells of one stim for a list
    of neurons) and :meth:`_mask` or :meth:`_coverage`. The base class adds recorded transforms
    (applied to every non-missing cell on read) and copy-on-write overrides.
    """

    def __init__(self, n_stims: int, n_neurons: int) -> None:
        self.n_stims = n_stims
        self.n_neurons = n_neurons
        self._transforms: tuple[CellTransform, ...] = ()
        self._overrides: dict[tuple[int, int], torch.Tensor] = {}

    # -- to implement ------------------------------------------------------
    @abstractmethod
    def _read_row(self, s: int, neurons: Sequence[int]) -> list[torch.Tensor]:
        """Raw cells ``(s, n)`` for ``n`` in ``neurons`` (sentinel where missing)."""

    def _mask(self) -> torch.Tensor:
        """``(S, N)`` validity of the raw cells (grids that know their blocks override :meth:`_coverage`)."""
        return self._coverage().to_dense()

    def _coverage(self) -> Coverage:
        """Validity of the raw cells, block-sparse."""
        return Coverage.dense(self._mask())

    # -- public ------------------------------------------------------------
    def __len__(self) -> int:
        return self.n_stims

    def __getitem__(self, s):
        if isinstance(s, slice):
            return [GridRow(self, j) for j in range(*s.indices(self.n_stims))]
        return GridRow(self, _normalise_index(s, self.n_stims, "stim"))

    def __setitem__(self, s: int, row: Sequence[torch.Tensor]) -> None:
        """Replace row ``s`` (one cell per neuron), as in a list grid: every cell is set by hand."""
        s = _normalise_index(s, self.n_stims, "stim")
        if len(row) != self.n_neurons:
            raise ValueError(f"row {s} needs one cell per neuron ({self.n_neurons}), got {len(row)}")
        for n, cell in enumerate(row):
            self.set_cell(s, n, cell)

    def __iter__(self) -> Iterator[GridRow]:
        for s in range(self.n_stims):
            yield GridRow(self, s)

    def cell(self, s: int, n: int) -> torch.Tensor:
        return self.row(s, [n])[0]

    def row(self, s: int, neurons: Sequence[int]) -> list[torch.Tensor]:
        """Cells ``(s, n)`` for each ``n`` in ``neurons``, read in one go."""
        neurons = list(neurons)
        todo = [n for n in neurons if (s, n) not in self._overrides]
        raw = dict(zip(todo, self._read_row(s, todo))) if todo else {}
        out = []
        for n in neurons:
            if (s, n) in self._overrides:
                out.append(self._overrides[(s, n)])
                continue
            cell = raw[n]
            if self._transforms and not is_missing(cell):
                for fn in self._transforms:
                    cell = fn(cell, s, n)
            out.append(cell)
        return out

    def read_raw_rows(self, stims: Sequence[int], neurons: Sequence[int] | None = None,
                      out: Sequence[np.ndarray] | None = None) -> list[RawRow]:
        """Valid cells of several stims (restricted to ``neurons``), batched.

        With ``out`` (one 1-D array per stim, sized by :meth:`row_sizes`), row
        ``i``'s values are written into ``out[i]``, which becomes its ``values``.
        Recorded transforms and overrides are applied by reading row by row;
        otherwise :meth:`_read_raw_rows` answers (store-backed grids: one
        concurrent read per batch that decodes straight into ``out``).
        """
        if self._transforms or self._overrides:
            return self._rows_one_by_one(stims, neurons, out)
        return self._read_raw_rows(stims, neurons, out)

    def _read_raw_rows(self, stims: Sequence[int], neurons: Sequence[int] | None,
                       out: Sequence[np.ndarray] | None) -> list[RawRow]:
        """The stored rows (no transform, no override); subclasses with a batched read override it."""
        return self._rows_one_by_one(stims, neurons, out)

    def _rows_one_by_one(self, stims: Sequence[int], neurons: Sequence[int] | None,
                         out: Sequence[np.ndarray] | None) -> list[RawRow]:
        neurons = range(self.n_neurons) if neurons is None else neurons
        return fill_rows([raw_row_from_cells(s, neurons, self.row(s, neurons)) for s in stims], out)

    def row_sizes(self, stims: Sequence[int], neurons: Sequence[int] | None = None
                  ) -> tuple[np.ndarray, np.dtype] | None:
        """Number of values of each row :meth:`read_raw_rows` would return, and their dtype,
        when known without reading the data (store-backed grids, no transform or override),
        else None."""
        return None if self._transforms or self._overrides else self._row_sizes(stims, neurons)

    def _row_sizes(self, stims: Sequence[int], neurons: Sequence[int] | None) -> tuple[np.ndarray, np.dtype] | None:
        """:meth:`row_sizes` of the stored rows; None where only reading tells."""
        return None

    def row_sizes_read_storage(self) -> bool:
        """Whether :meth:`row_sizes` reads storage first (an index not loaded, a source not
        opened yet): only then is it worth a thread per part of a concatenation."""
        return False

    def mask(self) -> torch.Tensor:
        """``(S, N)`` bool tensor, True where the pair holds data."""
        m = self._mask().clone()
        for (s, n), cell in self._overrides.items():
            m[s, n] = not is_missing(cell)
        return m

    def coverage(self) -> Coverage:
        """Validity of the pairs, block-sparse; a grid with cells set by hand falls back to one
        dense block (see :meth:`set_cell`)."""
        return Coverage.dense(self.mask()) if self._overrides else self._coverage()

    def set_cell(self, s: int, n: int, value: torch.Tensor) -> None:
        self._overrides[(s, n)] = value

    def content_signature(self) -> str | None:
        """A stable description of the cells this grid reads, equal only for grids that read equal
        cells (in any process or run): where they are stored (a store's fingerprint) and each
        recorded transform's description. None when there is none: cells not read from a store,
        cells set by hand, or a transform that does not describe itself (not a
        :class:`DescribedTransform`)."""
        stored = self._stored_signature()
        described = [getattr(fn, "signature", None) for fn in self._transforms]
        if stored is None or self._overrides or None in described:
            return None
        return "|".join([stored, *described])

    def _stored_signature(self) -> str | None:
        """:meth:`content_signature` of the untransformed cells; None unless they come from a store."""
        return None

    def with_transform(self, fn: CellTransform) -> "ResponseGrid":
        """A new view of the same data with ``fn`` applied to every valid cell on read."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone._transforms = self._transforms + (fn,)
        clone._overrides = {
            k: (v if is_missing(v) else fn(v, *k)) for k, v in self._overrides.items()
        }
        return clone

    def __repr__(self) -> str:
        return f"{type(self).__name__}(S={self.n_stims}, N={self.n_neurons})"


class BlockDiagonalGrid(ResponseGrid):
    """Block-diagonal concatenation of several datasets' response grids.

    Source ``k``'s stims x source ``k``'s neurons read from that source; every
    other pair is the missing sentinel, produced on access. Memory is
    O(number of sources); nothing is copied.
    """

    def __init__(self, sources: Sequence[Any], offsets: tuple[Sequence[int], Sequence[int]] | None = None) -> None:
        """``offsets``: ``(stim_offsets, neuron_offsets)`` of the sources, when known: the sources
        are then left as given (a lazy sequence of them is not walked)."""
        if offsets is None:
            self.sources = list(sources)
            offsets = (np.cumsum([0, *(d.get_S() for d in self.sources)]).tolist(),
                       np.cumsum([0, *(d.N_neurons for d in self.sources)]).tolist())
        else:
            self.sources = sources
        self.stim_offsets, self.neuron_offsets = list(offsets[0]), list(offsets[1])
        super().__init__(self.stim_offsets[-1], self.neuron_offsets[-1])

    def _stored_signature(self) -> str | None:
        parts = [content_signature(d.responses) for d in self.sources]
        return None if None in parts else f"concat({','.join(parts)})"

    def source_of_stim(self, s: int) -> int:
        return bisect.bisect_right(self.stim_offsets, s) - 1

    def _read_row(self, s: int, neurons: Sequence[int]) -> list[torch.Tensor]:
        k = self.source_of_stim(s)
        lo, hi = self.neuron_offsets[k], self.neuron_offsets[k + 1]
        inside = [n - lo for n in neurons if lo <= n < hi]
        cells = iter(read_row(self.sources[k].responses, s - self.stim_offsets[k], inside))
        return [next(cells) if lo <= n < hi else missing_sentinel() for n in neurons]

    def _by_source(self, stims: Sequence[int], neurons: Sequence[int] | None
                   ) -> Iterator[tuple[int, list[int], list[int], list[int] | None]]:
        """Per source ``k``: positions in ``stims``, its local stims and local neurons."""
        wanted = None if neurons is None else np.asarray(sorted(set(neurons)), dtype=np.int64)
        positions: dict[int, list[int]] = {}
        for i, s in enumerate(stims):
            positions.setdefault(self.source_of_stim(s), []).append(i)
        for k, where in positions.items():
            lo, hi = self.neuron_offsets[k], self.neuron_offsets[k + 1]
            local = None if wanted is None else (wanted[(wanted >= lo) & (wanted < hi)] - lo).tolist()
            yield k, where, [stims[i] - self.stim_offsets[k] for i in where], local

    def _read_raw_rows(self, stims: Sequence[int], neurons: Sequence[int] | None,
                       out: Sequence[np.ndarray] | None) -> list[RawRow]:
        """Delegate to each source's batched read, one call per source (concurrently when
        sources wait on the network)."""
        parts = list(self._by_source(stims, neurons))

        def read(part: tuple[int, list[int], list[int], list[int] | None]) -> list[RawRow]:
            k, where, local_stims, local = part
            return read_raw_rows(self.sources[k].responses, local_stims, local,
                                 None if out is None else [out[i] for i in where])

        rows: list[RawRow | None] = [None] * len(stims)
        for (k, where, _, _), got in zip(parts, map_parts(read, parts, self._grids(parts))):
            for i, row in zip(where, got):
                row.stim += self.stim_offsets[k]
                row.neurons = row.neurons + self.neuron_offsets[k]
                rows[i] = row
        return rows

    def _row_sizes(self, stims: Sequence[int], neurons: Sequence[int] | None) -> tuple[np.ndarray, np.dtype] | None:
        parts = list(self._by_source(stims, neurons))
        grids = self._grids(parts)

        def sizes(part: tuple[int, list[int], list[int], list[int] | None]) -> tuple[np.ndarray, np.dtype] | None:
            return raw_row_sizes(self.sources[part[0]].responses, part[2], part[3])

        # sizes from loaded indexes are a little numpy: threads would only add hand-offs
        reads = any(isinstance(g, ResponseGrid) and g.row_sizes_read_storage() for g in grids)
        found = map_parts(sizes, parts, grids) if reads else [sizes(part) for part in parts]
        if any(known is None for known in found):
            return None
        sizes = np.zeros(len(stims), dtype=np.int64)
        for (_, where, _, _), known in zip(parts, found):
            sizes[where] = known[0]
        return sizes, np.result_type(*[known[1] for known in found]) if found else np.dtype(np.float32)

    def row_sizes_read_storage(self) -> bool:
        return True  # not asked of every source of a large concatenation

    def _grids(self, parts: Sequence[tuple]) -> list[Any]:
        return [self.sources[part[0]].responses for part in parts]

    def _coverage(self) -> Coverage:
        return Coverage.block_diagonal([d.coverage for d in self.sources])


NETWORK_READ_THREADS = 8
"""Parts of a concatenation read at once when their reads wait on the network."""


def map_parts(fn: Callable[[Any], Any], items: Sequence[Any], parts: Sequence[Any]) -> list[Any]:
    """``[fn(x) for x in items]``, run concurrently (a few threads) when several of the
    corresponding ``parts`` (grids or sequences of a concatenation) wait on the network: a
    batch spanning many remote sources then costs a few round trips, not one per source.
    Local reads stay in the calling thread (they are CPU-bound: threads only add hand-offs)."""
    if len(items) > 1 and sum(bool(getattr(p, "waits_on_network", False)) for p in parts) > 1:
        return thread_map(fn, items, max_workers=NETWORK_READ_THREADS, name="deepstrf-parts", keep=True)
    return [fn(x) for x in items]


def read_many(seq: Sequence, indices: Sequence[int]) -> list[Any]:
    """``[seq[i] for i in indices]``, batched when ``seq`` is a :class:`LazySequence`."""
    if isinstance(seq, LazySequence):
        return seq.read_many(indices)
    return [seq[i] for i in indices]


def read_row(responses: Any, s: int, neurons: Sequence[int]) -> list[torch.Tensor]:
    """Cells ``(s, n)`` for ``n`` in ``neurons`` from a list grid or a view."""
    if isinstance(responses, ResponseGrid):
        return responses.row(s, neurons)
    row = responses[s]
    return [row[n] for n in neurons]


def read_raw_rows(responses: Any, stims: Sequence[int], neurons: Sequence[int] | None = None,
                  out: Sequence[np.ndarray] | None = None) -> list[RawRow]:
    """Batched raw read from a view, or row by row from a list grid (``out``: see
    :meth:`ResponseGrid.read_raw_rows`)."""
    if isinstance(responses, ResponseGrid):
        # grids that cannot size their rows ahead (row_sizes() is None) are never given out
        return responses.read_raw_rows(stims, neurons) if out is None else responses.read_raw_rows(stims, neurons, out)
    rows = []
    for s in stims:
        ids = range(len(responses[s])) if neurons is None else neurons
        rows.append(raw_row_from_cells(s, ids, read_row(responses, s, ids)))
    return fill_rows(rows, out)


def raw_row_sizes(responses: Any, stims: Sequence[int], neurons: Sequence[int] | None = None
                  ) -> tuple[np.ndarray, np.dtype] | None:
    """:meth:`ResponseGrid.row_sizes` of a view; None for a list grid."""
    return responses.row_sizes(stims, neurons) if isinstance(responses, ResponseGrid) else None


def check_out(out: Sequence[np.ndarray], sizes: Sequence[int]) -> None:
    """Refuse ``out`` arrays that are not one per row of exactly ``sizes`` elements."""
    if len(out) != len(sizes) or any(len(o) != n for o, n in zip(out, sizes)):
        raise ValueError(f"out must hold one array per stim, of sizes {list(sizes)}; "
                         f"got sizes {[len(o) for o in out]}")


def fill_rows(rows: list[RawRow], out: Sequence[np.ndarray] | None) -> list[RawRow]:
    """Copy each row's values into its ``out`` array (which becomes its ``values``)."""
    if out is None:
        return rows
    check_out(out, [len(r.values) for r in rows])
    for row, buf in zip(rows, out):
        buf[...] = row.values
        row.values = buf
    return rows


def content_signature(responses: Any) -> str | None:
    """:meth:`ResponseGrid.content_signature` of a view; None for a list grid (its cells can
    change in place)."""
    return responses.content_signature() if isinstance(responses, ResponseGrid) else None


def grid_mask(responses: Any, n_neurons: int) -> torch.Tensor:
    """``(S, N)`` validity mask of a list grid (by scanning) or of a view."""
    if isinstance(responses, ResponseGrid):
        return responses.mask()
    S = len(responses)
    m = torch.zeros((S, n_neurons), dtype=torch.bool)
    for s in range(S):
        row = responses[s]
        for n in range(n_neurons):
            m[s, n] = not is_missing(row[n])
    return m


def map_responses(responses: Any, fn: CellTransform, n_neurons: int) -> Any:
    """Apply ``fn`` to every valid cell: recorded for views; for lists, each row of the list is
    replaced by a new one (a concatenation made before keeps the rows it was made with); a dense
    ``(S, N, R, T)`` tensor (deepSTRF accepts one) is written in place, keeping its dtype, as
    deepSTRF does."""
    if isinstance(responses, ResponseGrid):
        return responses.with_transform(fn)
    for s in range(len(responses)):
        row = responses[s]
        new = [cell if n >= n_neurons or is_missing(cell) else fn(cell, s, n) for n, cell in enumerate(row)]
        if isinstance(responses, torch.Tensor):  # a row cannot be a list here: assign cell by cell
            for n, cell in enumerate(new):
                row[n] = cell
        else:
            responses[s] = new
    return responses


def map_stims(stims: Any, fn: StimTransform) -> Any:
    """Apply ``fn`` to every stimulus: eagerly for lists, recorded for views."""
    if isinstance(stims, list):
        return [fn(x, i) for i, x in enumerate(stims)]
    return MappedSequence(stims, fn)
