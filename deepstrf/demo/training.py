"""The training loop of the demo, on compact batches only.

A batch source is a function ``epoch -> iterable of CompactBatch``: the demo
streams from its stores (``DemoData.batches`` in :mod:`.run`);
:func:`compact_batches` does the same for an in-memory dataset.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..datasets.collate import CompactBatch, compact_collate
from ..datasets.neural_dataset import NeuralDataset
from ..models import PooledEncodingModel, poisson_loss_compact


def compact_batches(ds: NeuralDataset, *, batch_size: int, shuffle: bool, seed: int, epoch: int = 0,
                    workers: int = 0) -> Iterable[CompactBatch]:
    """Batches of the visible items of an in-memory ``ds`` (its current selections), as
    :class:`CompactBatch`, through a map-style ``DataLoader`` (order from ``(seed, epoch)``).

    The demo itself streams from stores (:meth:`deepstrf.demo.run.DemoData.batches`); this is
    the same batch source for datasets that live in memory.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=workers,
                      collate_fn=functools.partial(compact_collate, neuron_index=ds.selected_neurons()))


BatchSource = Callable[[int], Iterable[CompactBatch]]  # epoch -> batches


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 4
    lr: float = 3e-3
    weight_decay: float = 0.0
    seed: int = 0
    channels: tuple[int, ...] = (16, 8)
    kernel_f: tuple[int, ...] | int = (5, 3)
    kernel_t: tuple[int, ...] | int = (12, 6)
    monitor_points: int = 20  # held-out loss evaluated on at most this many epochs


@dataclass
class History:
    """Per-epoch mean Poisson NLL per observation (train, and held-out monitoring)."""

    train_loss: list[float] = field(default_factory=list)
    heldout_loss: list[float] = field(default_factory=list)
    heldout_epochs: list[int] = field(default_factory=list)
    steps_at_epoch: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    steps: int = 0

    def to_dict(self) -> dict:
        return {"train_loss": self.train_loss, "heldout_loss": self.heldout_loss,
                "heldout_epochs": self.heldout_epochs, "steps_at_epoch": self.steps_at_epoch,
                "seconds": self.seconds, "steps": self.steps}


@torch.no_grad()
def mean_counts(batches: Iterable[CompactBatch], n_neurons: int) -> torch.Tensor:
    """Per-neuron mean count per bin over the given batches (the mean-rate baseline)."""
    total = torch.zeros(n_neurons, dtype=torch.float64)
    n_obs = torch.zeros(n_neurons, dtype=torch.float64)
    for b in batches:
        ysum = b.repeat_sum(torch.float64)
        total.index_add_(0, b.neuron_index, ysum.sum(1))
        n_obs.index_add_(0, b.neuron_index, (b.repeats * b.lengths).double())
    overall = total.sum() / n_obs.sum().clamp(min=1)
    return torch.where(n_obs > 0, total / n_obs.clamp(min=1), overall).float()


@torch.no_grad()
def batch_loss(model: PooledEncodingModel, batches: Iterable[CompactBatch]) -> float:
    """Mean Poisson NLL per observation over the batches."""
    model.eval()
    total, n = 0.0, 0
    for b in batches:
        total += float(poisson_loss_compact(model.predict(b), b, reduction="sum"))
        n += b.n_observations()
    return total / max(n, 1)


def fit(model: PooledEncodingModel, train: BatchSource, cfg: TrainConfig, *, heldout: BatchSource | None = None,
        desc: str = "train", progress: bool = True) -> History:
    """Adam on the masked Poisson loss of compact batches, ``cfg.epochs`` epochs.

    ``heldout`` is only *monitored* (learning curve, on at most
    ``cfg.monitor_points`` epochs); nothing is selected on it.
    """
    torch.manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1), eta_min=cfg.lr * 0.05)
    hist = History()
    bar = tqdm(range(cfg.epochs), desc=desc, unit="epoch", disable=not progress, dynamic_ncols=True)
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        total, n = 0.0, 0
        for b in tqdm(train(epoch), desc=f"{desc} epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False,
                      disable=not progress, dynamic_ncols=True):
            pred = model.predict(b)
            loss_sum = poisson_loss_compact(pred, b, reduction="sum")
            n_obs = b.n_observations()
            opt.zero_grad(set_to_none=True)
            (loss_sum / max(n_obs, 1)).backward()
            opt.step()
            total += float(loss_sum.detach())
            n += n_obs
            hist.steps += 1
        sched.step()
        hist.train_loss.append(total / max(n, 1))
        hist.steps_at_epoch.append(hist.steps)
        every = max(1, math.ceil(cfg.epochs / max(cfg.monitor_points, 1)))
        if heldout is not None and ((epoch + 1) % every == 0 or epoch + 1 == cfg.epochs):
            hist.heldout_loss.append(batch_loss(model, heldout(epoch)))
            hist.heldout_epochs.append(epoch + 1)
        hist.seconds.append(time.perf_counter() - t0)
        post = {"loss": f"{hist.train_loss[-1]:.4f}"}
        if hist.heldout_loss:
            post["heldout"] = f"{hist.heldout_loss[-1]:.4f}"
        bar.set_postfix(post)
        if not math.isfinite(hist.train_loss[-1]):
            raise FloatingPointError(f"{desc}: training loss became {hist.train_loss[-1]} at epoch {epoch + 1}")
    return hist


def build_model(n_neurons: int, n_freq: int, cfg: TrainConfig, baseline: torch.Tensor | None = None
                ) -> PooledEncodingModel:
    """The demo's model, heads initialised at the baseline rates when given."""
    torch.manual_seed(cfg.seed)
    model = PooledEncodingModel(n_neurons, n_freq=n_freq, channels=cfg.channels, kernel_f=cfg.kernel_f,
                                kernel_t=cfg.kernel_t)
    if baseline is not None:
        model.readout.init_rates(baseline)
    return model
