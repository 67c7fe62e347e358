"""Batch sampler whose batches each come from a single source of a pool."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from .neural_dataset import NeuralDataset


class SourceBatchSampler(Sampler[list[int]]):
    """Yield batches of item indices that all belong to one source.

    Useful with per-source output heads or losses. Items are the visible
    items of ``dataset`` under its current selection; order is shuffled per
    ``(seed, epoch)`` when ``shuffle`` is set (call :meth:`set_epoch`).
    """

    def __init__(self, dataset: NeuralDataset, batch_size: int, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _groups(self) -> list[list[int]]:
        visible = self.dataset.visible_stims()
        groups = []
        for _, stims, _ in self.dataset.source_blocks():
            groups.append([i for i, s in enumerate(visible) if stims.start <= s < stims.stop])
        return [g for g in groups if g]

    def _batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        batches = []
        for group in self._groups():
            if self.shuffle:
                group = [group[i] for i in torch.randperm(len(group), generator=g).tolist()]
            for i in range(0, len(group), self.batch_size):
                batch = group[i:i + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())
