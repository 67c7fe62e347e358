"""Stim or neuron metadata of a large pool: a list of dicts, loaded on first use.

A pool of 10^4 sessions has 10^5 stims and 2·10^5 neurons. Its metadata is
stored as columns (one list per key) and read only when asked for;
:meth:`MetaTable.matching` answers ``meta[key] == value`` from a column,
without building 2·10^5 dicts, and ``meta[i]`` builds row ``i`` alone (a
streamed batch needs its own items' rows, not 10^5 of them). A row, once
handed out, is the same dict from then on, so edits stick as on a list;
iterating builds every row once.

Both tables answer what code written for a list of dicts reads: ``len``, indexing, slices
(lists), iteration, ``==`` against a list and ``+`` (a list). They cannot grow or shrink:
``append`` and the like raise a ``TypeError`` that says to take ``list(ds.stim_meta)``, as
``json.dumps`` needs too.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..bulk import gc_paused

Columns = dict[str, tuple[list, set[int]]]
_ABSENT = object()
# one load of a table at a time: threads reading batches at once would each fetch the same table
_LOADING = threading.Lock()


def _new_loading_lock() -> None:
    global _LOADING
    _LOADING = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_loading_lock)  # a thread of the parent may have held it


_LIST_EDITS = {name: f".{name}()" for name in ("append", "extend", "insert", "pop", "remove", "clear", "sort",
                                               "reverse")}
_LIST_EDITS |= {"__delitem__": "del", "__iadd__": "+="}


class _ListLike(Sequence):
    """What a list of dicts answers without building every row; edits of the sequence itself
    (``append``, ``sort``, ``del``, ...) are refused with a message that says to take ``list(...)``."""

    name = "metadata"  # the dataset attribute it is, for messages

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(self) == len(other) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # as a list's

    def __add__(self, other: object) -> list[dict]:
        if isinstance(other, (list, _ListLike)):
            return list(self) + list(other)
        return NotImplemented

    def __radd__(self, other: object) -> list[dict]:
        if isinstance(other, list):
            return other + list(self)
        return NotImplemented

    def copy(self) -> list[dict]:
        """All rows as a new list (as ``list.copy``)."""
        return list(self)


def _refusing(method: str, edit: str) -> Callable[..., Any]:
    def refuse(self: _ListLike, *args: Any, **kw: Any) -> Any:
        raise TypeError(
            f"{self.name} is a lazy table of {len(self)} rows read from the store, not a list: it cannot be "
            f"edited with {edit}. Take a list first, meta = list(ds.{self.name}), edit it and assign it back "
            f"(ds.{self.name} = meta).")
    refuse.__name__ = method
    refuse.__doc__ = "Refused: the table is not a list (take ``list(...)``)."
    return refuse


for _method, _edit in _LIST_EDITS.items():
    setattr(_ListLike, _method, _refusing(_method, _edit))


class MetaTable(_ListLike):
    """``n`` metadata dicts whose columns ``load()`` returns (``{key: (values, absent rows)}``);
    ``name`` is the dataset attribute it is (``stim_meta``, ``nrn_meta``), for messages."""

    def __init__(self, n: int, load: Callable[[], Columns], name: str = "metadata") -> None:
        self._n = n
        self.name = name
        self._load = load
        self._load_rows: Callable[[], list[dict]] | None = None
        self._columns: Columns | None = None
        self._rows: list[dict] | None = None
        self._handed_out: dict[int, dict] = {}  # rows built one by one, before all were

    @classmethod
    def from_rows(cls, n: int, load_rows: Callable[[], list[dict]], name: str = "metadata") -> "MetaTable":
        """A table whose ``n`` rows ``load_rows()`` returns on first use."""
        table = cls(n, load=lambda: {}, name=name)  # never called: rows() and matching() test _load_rows first
        table._load_rows = load_rows
        return table

    def _loaded_columns(self) -> Columns:
        """The columns of a column-backed table (a row-backed one has none: callers check first)."""
        if self._columns is None:
            with _LOADING:
                if self._columns is None:
                    self._columns = self._load()
        return self._columns

    def _by_columns(self) -> bool:
        """Are rows still answered from the columns (not all built, not loaded as rows)?"""
        return self._rows is None and self._load_rows is None

    def rows(self) -> list[dict]:
        """The metadata as a list of dicts (built once; rows already handed out are kept)."""
        if self._rows is None and self._load_rows is not None:
            with _LOADING:
                if self._rows is None:
                    self._rows = self._load_rows()
        if self._rows is None:
            cols = self._loaded_columns()
            with gc_paused():
                rows: list[dict] = [{} for _ in range(self._n)]
                for key, (values, absent) in cols.items():
                    for i, (row, v) in enumerate(zip(rows, values)):
                        if i not in absent:
                            row[key] = v
                for i, row in self._handed_out.items():
                    rows[i] = row
            self._rows, self._handed_out = rows, {}
        return self._rows

    def _row(self, i: int) -> dict:
        """Row ``i`` (``0 <= i < n``), built from the columns alone on first access."""
        if not self._by_columns():
            return self.rows()[i]
        row = self._handed_out.get(i)
        if row is None:
            row = {key: values[i] for key, (values, absent) in self._loaded_columns().items() if i not in absent}
            row = self._handed_out.setdefault(i, row)  # another thread may have built it meanwhile
        return row

    def matching(self, key: str, value: Any) -> list[int] | None:
        """Rows whose ``key`` equals ``value`` (rows without the key never match); None when rows
        were built (they may have been edited) or come as rows: the caller then tests them. Rows
        handed out one by one are tested as they are now."""
        if not self._by_columns():
            return None
        cols = self._loaded_columns()
        out = []
        if key in cols:
            values, absent = cols[key]
            out = [i for i, v in enumerate(values) if v == value and i not in absent and i not in self._handed_out]
        out += [i for i, row in self._handed_out.items() if row.get(key, _ABSENT) == value]
        return sorted(out)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._row(j) for j in range(*i.indices(self._n))]
        j = i + self._n if i < 0 else i
        if not 0 <= j < self._n:
            raise IndexError(f"metadata index {i} out of range for size {self._n}")
        return self._row(j)

    def __setitem__(self, i: int, value: dict) -> None:
        j = i + self._n if i < 0 else i
        if not 0 <= j < self._n:
            raise IndexError(f"metadata index {i} out of range for size {self._n}")
        if self._by_columns():
            self._handed_out[j] = value
        else:
            self.rows()[j] = value

    def __iter__(self) -> Iterator[dict]:
        return iter(self.rows())

    def __repr__(self) -> str:
        return f"MetaTable(n={self._n}, loaded={self._rows is not None or self._columns is not None})"


class MetaSlice(_ListLike):
    """Rows ``[start, stop)`` of a :class:`MetaTable` (a pooled source's own metadata)."""

    def __init__(self, table: MetaTable, start: int, stop: int) -> None:
        self.table, self.start, self.stop = table, start, stop
        self.name = table.name

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        j = i + len(self) if i < 0 else i
        if not 0 <= j < len(self):
            raise IndexError(f"metadata index {i} out of range for size {len(self)}")
        return self.table[self.start + j]

    def __iter__(self) -> Iterator[dict]:
        return (self.table[i] for i in range(self.start, self.stop))


def matching_attr(metas: Sequence[dict], key: str, value: Any) -> list[int] | None:
    """Fast ``[i for i, m in enumerate(metas) if m.get(key) == value]`` for a table not yet
    built into rows; None when the caller must test the rows."""
    return metas.matching(key, value) if isinstance(metas, MetaTable) else None
