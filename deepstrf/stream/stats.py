"""Streaming counters, shared between the main process and its DataLoader workers.

The counters live in a small shared-memory tensor created by the dataset in
the main process, one row per process slot (slot 0: iteration in the main
process, slot ``k + 1``: DataLoader worker ``k``). DataLoader workers inherit
the tensor (fork) or receive its shared-memory handle (spawn), so every
worker's increments are visible to :meth:`StreamCounters.totals` in the main
process. Under DDP each rank has its own counters (sum them with
``torch.distributed.all_reduce`` if needed).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import torch

FIELDS = ("requests", "bytes_fetched", "bytes_used", "items", "batches", "retries", "cache_hits",
          "read_us")
MAX_SLOTS = 129  # the main process + 128 DataLoader workers; further workers are not counted


class StreamCounters:
    """Per-process-slot integer counters in shared memory (see module docstring)."""

    def __init__(self) -> None:
        self._table = torch.zeros((MAX_SLOTS, len(FIELDS)), dtype=torch.int64).share_memory_()
        self._slot = 0
        self._lock = threading.Lock()  # a process's read threads add concurrently

    def __getstate__(self) -> dict:
        return {"_table": self._table, "_slot": self._slot}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def use_slot(self, slot: int) -> None:
        """Count into row ``slot`` from now on (called once inside each worker)."""
        self._slot = slot

    def add(self, **amounts: int) -> None:
        """Increment counters of this process's slot, e.g. ``add(items=8, bytes_used=1024)``."""
        if self._slot >= MAX_SLOTS:
            return
        row = self._table[self._slot]
        with self._lock:
            for name, value in amounts.items():
                row[FIELDS.index(name)] += int(value)

    def reset_slot(self) -> None:
        """Zero this process's slot (each worker does at the start of its pass)."""
        if self._slot < MAX_SLOTS:
            self._table[self._slot].zero_()

    def reset(self) -> None:
        """Zero every slot (call between epochs, while no worker is running)."""
        self._table.zero_()

    def totals(self) -> dict[str, int]:
        """Sum over the main process and all workers."""
        total = self._table.sum(dim=0).tolist()
        return dict(zip(FIELDS, total))


class StorageIO:
    """Turns a store's running ``(requests, bytes)`` totals into per-read increments.

    One per opened dataset and process; safe to call from several read threads
    (each increment is attributed once, whichever thread observes it).
    """

    def __init__(self, start: tuple[int, int]) -> None:
        self._last = start
        self._lock = threading.Lock()

    def delta(self, now: tuple[int, int]) -> tuple[int, int]:
        with self._lock:
            last, self._last = self._last, (max(now[0], self._last[0]), max(now[1], self._last[1]))
        return max(0, now[0] - last[0]), max(0, now[1] - last[1])


def summarize(totals: Mapping[str, int], seconds: float | None = None) -> dict[str, float]:
    """Counters plus derived figures: ``read_seconds``, ``used_fraction`` (``bytes_used /
    bytes_fetched``: decoded bytes per fetched byte, above 1 where compression saved transfer) and,
    with ``seconds``, rates."""
    out: dict[str, float] = dict(totals)
    out["read_seconds"] = totals["read_us"] / 1e6
    if totals["bytes_fetched"]:
        out["used_fraction"] = totals["bytes_used"] / totals["bytes_fetched"]
    if seconds:
        out["seconds"] = seconds
        out["items_per_s"] = totals["items"] / seconds
        out["mb_fetched_per_s"] = totals["bytes_fetched"] / seconds / 1e6
    return out
