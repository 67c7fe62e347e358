"""Which units of an epoch's order each rank and worker reads: pure functions.

An epoch is an ordered list of *units* (items, or whole batches when batches
must be source-homogeneous; see :mod:`deepstrf.stream.shuffle`). Reading
proceeds in global *steps*: at each step every rank takes one batch of at most
``batch_size`` units. A run that already consumed the first ``offset`` units
of the order (a resumed run) partitions only the rest, so resumption with any
number of ranks or workers is arithmetic on ``offset``.

Equal batch counts across ranks: the remaining ``L`` units are padded to a
multiple of ``world_size`` by repeating units from the start of the
remainder (``drop_last=False``, the default: at most ``world_size - 1``
repeats, none when ``L`` is divisible by ``world_size``), or truncated to one
(``drop_last=True``: at most ``world_size - 1`` units skipped this epoch).
Every rank then holds ``m = L' / world_size`` units in ``ceil(m / batch_size)``
batches; the last step's batches are all ``m mod batch_size`` long, so
every rank has the same batch count and batch sizes. Global step ``j`` covers
the contiguous positions ``[j * W * B, j * W * B + W * b_j)`` of the padded
remainder, rank ``r`` the ``r``-th slice of ``b_j`` of them; after ``k``
steps on every rank exactly the first ``min(k * W * B, L)`` units are
consumed.

Within a rank, batch ``j`` goes to DataLoader worker ``j mod num_workers``,
which is the order in which ``DataLoader`` collects results from its workers,
so the batches come out of the loader in step order.
"""

from __future__ import annotations

import numpy as np


def _check(n_units: int, offset: int, world_size: int, rank: int, batch_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= offset <= n_units:
        raise ValueError(f"offset (units already consumed) must be in [0, {n_units}], got {offset}")


def units_per_rank(n_units: int, offset: int, world_size: int, drop_last: bool = False) -> int:
    """Units each rank reads from ``offset`` to the end of the epoch (padded or truncated)."""
    remaining = n_units - offset
    if drop_last:
        return remaining // world_size
    return -(-remaining // world_size)


def num_batches(n_units: int, offset: int, world_size: int, batch_size: int, drop_last: bool = False) -> int:
    """Batches every rank yields from ``offset`` to the end of the epoch (same on all ranks)."""
    return -(-units_per_rank(n_units, offset, world_size, drop_last) // batch_size)


def rank_batches(n_units: int, offset: int, world_size: int, rank: int, batch_size: int,
                 drop_last: bool = False) -> list[np.ndarray]:
    """Positions (into the epoch's unit order) of each batch of ``rank``, in step order."""
    _check(n_units, offset, world_size, rank, batch_size)
    remaining = n_units - offset
    m = units_per_rank(n_units, offset, world_size, drop_last)
    steps = np.arange(-(-m // batch_size), dtype=np.int64)
    sizes = np.minimum(batch_size, m - steps * batch_size)  # only the last batch may be shorter
    starts = steps * world_size * batch_size + rank * sizes
    padded = starts[:, None] + np.arange(batch_size, dtype=np.int64)
    positions = offset + padded % max(remaining, 1)  # positions past the end wrap: padding repeats
    return [row[:b] for row, b in zip(positions, sizes.tolist())]


def worker_batches(batches: list[np.ndarray], worker_id: int, num_workers: int) -> list[tuple[int, np.ndarray]]:
    """``(step, positions)`` of the batches a DataLoader worker reads (round robin)."""
    if num_workers < 1 or not 0 <= worker_id < num_workers:
        raise ValueError(f"worker_id must be in [0, num_workers), got {worker_id} of {num_workers}")
    return [(j, batches[j]) for j in range(worker_id, len(batches), num_workers)]


def consumed_after(n_units: int, offset: int, world_size: int, batch_size: int, steps: int,
                   drop_last: bool = False) -> int:
    """Units of the order consumed once every rank has yielded ``steps`` batches from ``offset``.

    This is the ``offset`` to resume from; it equals ``n_units`` when the
    epoch is complete (padding repeats are not counted; with ``drop_last``
    the dropped tail counts as consumed once every batch is done).
    """
    if steps >= num_batches(n_units, offset, world_size, batch_size, drop_last):
        return n_units
    return offset + steps * world_size * batch_size
