"""The order of an epoch: pure functions of (seed, epoch).

Items are the visible stims in store order, so consecutive items are
neighbours in the store (their responses share chunks or sit in adjacent
byte ranges). :func:`block_shuffle` keeps runs of ``block_size`` consecutive
items together, permutes the runs, then shuffles items inside windows of
``buffer_size`` items: each batch then draws from a few runs (reads stay
in large runs) while the epoch as a whole is well mixed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def epoch_rng(seed: int, epoch: int, *stream: int) -> np.random.Generator:
    """Independent generator for ``(seed, epoch, *stream)``; identical in every process."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    return np.random.default_rng([seed, epoch, *stream])


def block_shuffle(n: int, seed: int, epoch: int, block_size: int = 8, buffer_size: int = 256,
                  stream: Sequence[int] = ()) -> np.ndarray:
    """A permutation of ``range(n)``: shuffled runs of ``block_size``, then items shuffled in windows.

    ``block_size=1`` with ``buffer_size >= n`` is a uniform permutation.
    """
    if block_size < 1 or buffer_size < 1:
        raise ValueError(f"block_size and buffer_size must be >= 1, got {block_size}, {buffer_size}")
    rng = epoch_rng(seed, epoch, *stream)
    starts = rng.permutation(np.arange(0, n, block_size)).astype(np.int64)
    runs = starts[:, None] + np.arange(block_size, dtype=np.int64)  # each run's items; only the last run
    order = runs[runs < n]                                           # can pass the end
    for lo in range(0, n, buffer_size):
        window = order[lo:lo + buffer_size]
        order[lo:lo + buffer_size] = window[rng.permutation(len(window))]
    return order


def item_order(n: int, *, shuffle: bool, seed: int, epoch: int, block_size: int = 8,
               buffer_size: int = 256) -> np.ndarray:
    """The epoch's order of item positions ``0..n-1`` (identity without ``shuffle``)."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return block_shuffle(n, seed, epoch, block_size, buffer_size)


def homogeneous_batches(groups: Sequence[Sequence[int]], batch_size: int, *, shuffle: bool, seed: int,
                        epoch: int, block_size: int = 8, buffer_size: int = 256) -> list[np.ndarray]:
    """Batches of item positions that each come from one group (source).

    Each group is ordered (block-shuffled when ``shuffle``), cut into batches
    of ``batch_size`` (the group's last batch may be shorter), and the batches
    of all groups are then interleaved in a shuffled order.
    """
    batches: list[np.ndarray] = []
    for k, group in enumerate(groups):
        group = np.asarray(group, dtype=np.int64)
        if shuffle:
            group = group[block_shuffle(len(group), seed, epoch, block_size, buffer_size, stream=(1, k))]
        batches.extend(group[i:i + batch_size] for i in range(0, len(group), batch_size))
    if shuffle:
        rng = epoch_rng(seed, epoch, 2)
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches
