"""PyTorch Lightning: a ``LightningDataModule`` that streams a source or pool store.

``PoolDataModule(url)`` holds out stims within each source (the demo's split,
plus a validation share of each source's training stims) and serves train /
val / test loaders from :class:`~deepstrf.stream.StreamingNeuralDataset`.

Distributed training: the datasets shard themselves by rank (and DataLoader
worker), every item once per epoch with the same number of batches on every
rank; Lightning leaves an ``IterableDataset`` alone (no ``DistributedSampler``).
The datasets are made in :meth:`~PoolDataModule.setup`, after Lightning has
started the process group, so they see the ranks.

Resuming: :meth:`~PoolDataModule.state_dict` (saved in Lightning checkpoints)
records how far the training epoch went, counting the batches the trainer
took (its fetcher reads one ahead), so a checkpoint taken mid-epoch resumes
with the same remaining order. Counting uses this module's
``on_before_batch_transfer`` hook, which Lightning calls instead of the
LightningModule's: it passes the batch on to the LightningModule's own hook.

Needs the ``lightning`` package: ``pip install "deepstrf-pool[lightning]"``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

try:
    import lightning
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError('deepstrf.lightning needs the "lightning" package: pip install "deepstrf-pool[lightning]"'
                      ) from exc

from lightning.pytorch.utilities.model_helpers import is_overridden

from .datasets.neural_dataset import NeuralDataset
from .datasets.splits import train_val_test_split
from .stream.dataset import Collate, StreamingNeuralDataset
from .stream.loader import StreamingDataLoader

PARTS = ("train", "val", "test")


class PoolDataModule(lightning.LightningDataModule):
    """Train / val / test loaders streaming a store URL (or a dataset) with per-source held-out stims.

    ``test_fraction`` of each source's stims are held out for testing (the demo's
    :func:`~deepstrf.datasets.splits.heldout_split`, by ``split_seed``), ``val_fraction`` of
    each source's remaining stims for validation; with ``group_by`` (a ``stim_meta`` key naming the
    same stimulus in two sources) no stim sharing its group with a test or validation stim is trained
    on. Batches are built by the dataset:
    ``collate="compact"`` (:class:`~deepstrf.utils.data.CompactBatch`) or ``"dense"``
    (deepSTRF's ``neural_collate`` dict), ``batch_size`` items each, over one neuron axis in
    every part (each part is a ``subset`` of one selection); training order is
    shuffled by ``(seed, epoch)``. ``num_workers`` and ``loader_options`` go to
    :meth:`StreamingNeuralDataset.loader`, other keyword arguments (``cache_dir``,
    ``drop_last``, ``select``, ``open_options``...) to every :class:`StreamingNeuralDataset`
    (``open_options`` also opens the store for the split).
    """

    def __init__(self, source: str | os.PathLike | NeuralDataset, *, storage_options: dict | None = None,
                 batch_size: int = 8, collate: Collate = "compact", num_workers: int = 0,
                 test_fraction: float = 0.2, val_fraction: float = 0.1, split_seed: int = 0, seed: int = 0,
                 group_by: str | None = None, loader_options: dict | None = None, **stream_options: Any) -> None:
        super().__init__()
        if not isinstance(source, (str, os.PathLike, NeuralDataset)):
            raise TypeError(f"PoolDataModule: source must be a store URL or a NeuralDataset, got "
                            f"{type(source).__name__}")
        self.source, self.storage_options = source, storage_options
        self.batch_size, self.collate, self.num_workers = batch_size, collate, num_workers
        self.test_fraction, self.val_fraction = test_fraction, val_fraction
        self.split_seed, self.seed, self.group_by = split_seed, seed, group_by
        self.loader_options = dict(loader_options or {})
        self.stream_options = stream_options
        self.split: dict[str, list[int]] | None = None
        self.streams: dict[str, StreamingNeuralDataset] = {}
        self._resume: dict | None = None  # a loaded training state, applied when the training dataset is made
        self._trained = 0                 # batches of the current training pass the trainer took

    # -- data ----------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Split the stims (once) and make the datasets (in every process, after the process group)."""
        if self.split is None:
            self.split = train_val_test_split(self._opened(), self.test_fraction, self.val_fraction,
                                              self.split_seed, group_by=self.group_by)
        for part in PARTS:
            self.stream(part)

    def _opened(self) -> NeuralDataset:
        if isinstance(self.source, NeuralDataset):
            return self.source
        from .store import open_dataset

        return open_dataset(os.fspath(self.source), storage_options=self.storage_options,
                            **(self.stream_options.get("open_options") or {}))

    def stream(self, part: str) -> StreamingNeuralDataset:
        """The :class:`StreamingNeuralDataset` of ``part`` (``"train"``, ``"val"`` or ``"test"``)."""
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        if part not in self.streams:
            if self.split is None:
                self.setup()
            ds = StreamingNeuralDataset(self.source, storage_options=self.storage_options,
                                        batch_size=self.batch_size, collate=self.collate, shuffle=part == "train",
                                        seed=self.seed, subset=self.split[part], **self.stream_options)
            self.streams[part] = ds
            if part == "train" and self._resume is not None:
                ds.load_state_dict(self._resume)
                self._resume = None
        return self.streams[part]

    def train_dataloader(self) -> StreamingDataLoader:
        return EpochLoader(self, num_workers=self.num_workers, **self.loader_options)

    def val_dataloader(self) -> StreamingDataLoader | list:
        return self._eval_loader("val")

    def test_dataloader(self) -> StreamingDataLoader | list:
        return self._eval_loader("test")

    def _eval_loader(self, part: str) -> StreamingDataLoader | list:
        if self.split is None:
            self.setup()
        if not self.split[part]:
            return []  # Lightning skips a loop without batches (val_fraction=0)
        return self.stream(part).loader(num_workers=self.num_workers, **self.loader_options)

    # -- resumption ----------------------------------------------------------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Counts the training batches the trainer takes, then runs the LightningModule's hook."""
        if self.trainer is None:
            return batch
        if self.trainer.training:
            self._trained += 1
        module = self.trainer.lightning_module
        if is_overridden("on_before_batch_transfer", module):  # Lightning calls only this one
            batch = module.on_before_batch_transfer(batch, dataloader_idx)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The split and how far the training epoch went (the batches the trainer took)."""
        return {"split": self.split, "train": self.train_state()}

    def train_state(self) -> dict | None:
        """The training dataset's position (:meth:`StreamingNeuralDataset.state_dict`), counting the
        batches the trainer took; None before there is one."""
        if "train" in self.streams:
            return self.streams["train"].state_dict(batches=self._trained)
        return self._resume

    def load_train_state(self, state: dict) -> None:
        """Resume the training dataset at ``state`` (from :meth:`train_state`)."""
        if "train" in self.streams:
            self.streams["train"].load_state_dict(state)
        else:
            self._resume = state
        self._trained = 0

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume at ``state_dict`` (from :meth:`state_dict`); the split must be the same."""
        split = state_dict.get("split")
        if self.split is not None and split is not None and _parts(split) != _parts(self.split):
            raise ValueError("PoolDataModule: the checkpoint was made with another stim split (other store, "
                             "fractions or split_seed); resume with the same data and split arguments")
        self.split = split if split is not None else self.split
        if state_dict.get("train") is not None:
            self.load_train_state(state_dict["train"])


def _parts(split: dict[str, list[int]]) -> dict[str, list[int]]:
    """The stims of each part (what a checkpoint must agree on; older ones list no exclusions)."""
    return {part: split[part] for part in PARTS}


class EpochLoader(StreamingDataLoader):
    """The training loader of a :class:`PoolDataModule`: follows the trainer's epoch, has the length
    of a whole epoch (Lightning counts a resumed epoch's batches from where it stopped), and is
    resumable the way Lightning asks a loader to be (``state_dict`` / ``load_state_dict``: the
    module's training state)."""

    def __init__(self, module: PoolDataModule, **kwargs: Any) -> None:
        self.module = module
        super().__init__(module.stream("train"), **kwargs)

    def __len__(self) -> int:
        """A whole epoch's batches; at least the batches the trainer counts as done plus this rank's
        rest in an epoch resumed from a checkpoint made with other devices or another batch size:
        Lightning counts a resumed epoch on from the checkpoint's batch index and reads the length
        once, so a whole epoch in the new setting could end the resumed one before its rest."""
        whole = self.dataset.batches_per_epoch()
        trainer = self.module.trainer
        rest = len(self.dataset)
        if trainer is None or rest >= whole:
            return whole
        return max(whole, trainer.fit_loop.epoch_loop.batch_progress.current.ready + rest)

    def state_dict(self) -> dict | None:
        return self.module.train_state()

    def load_state_dict(self, state: dict | None) -> None:
        if state is not None:
            self.module.load_train_state(state)

    def __iter__(self) -> Iterator[Any]:
        trainer = self.module.trainer
        if trainer is not None:
            self.dataset.set_epoch(trainer.current_epoch)  # the same epoch keeps a resumed position
        self.module._trained = 0
        yield from super().__iter__()
        self.module._trained = 0  # the pass is complete: the dataset is at the next epoch's start
