"""One model for a whole pool: a shared causal conv backbone + per-neuron heads.

The backbone turns a spectrogram batch ``(B, C, F, T)`` into features
``(B, D, T)``; it is time-causal (the features at bin ``t`` depend on the
stimulus up to ``t`` only), so prediction ``t`` never sees the future. The
readout keeps one linear head per *global* neuron id, so a single model
serves every neuron of a pool, and only the heads of the neurons present in
a batch are evaluated: with a :class:`~deepstrf.datasets.collate.CompactBatch`
the model predicts exactly the valid cells, never the missing ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..datasets import cells
from ..datasets.collate import CompactBatch
from .neural_model import NeuralModel

_ACTIVATIONS = {"elu": nn.ELU, "relu": nn.ReLU, "gelu": nn.GELU, "softplus": nn.Softplus, "tanh": nn.Tanh}


class CausalConv2d(nn.Conv2d):
    """``Conv2d`` over ``(F, T)``: 'same' along frequency, causal along time.

    The input is left-padded by ``dilation * (kernel_t - 1)`` bins in time,
    so output bin ``t`` sees input bins ``<= t`` only, and ``T`` is kept.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_f: int, kernel_t: int,
                 dilation_t: int = 1, bias: bool = True):
        if kernel_f % 2 == 0:
            raise ValueError(f"kernel_f must be odd to keep F ('same' padding), got {kernel_f}")
        super().__init__(in_channels, out_channels, (kernel_f, kernel_t), padding=(kernel_f // 2, 0),
                         dilation=(1, dilation_t), bias=bias)
        self.left_pad = dilation_t * (kernel_t - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.left_pad, 0)))


class CausalConvBackbone(nn.Module):
    """Stack of :class:`CausalConv2d` layers, flattened to ``(B, channels[-1] * F, T)``.

    A nonlinearity follows every layer but the last, so one layer is a bank
    of linear spectro-temporal filters and deeper stacks are nonlinear.
    """

    def __init__(self, n_freq: int, in_channels: int = 1, channels: Sequence[int] = (8,),
                 kernel_f: Sequence[int] | int = 5, kernel_t: Sequence[int] | int = 12,
                 activation: str = "elu"):
        super().__init__()
        channels = list(channels)
        if not channels:
            raise ValueError("channels must list at least one layer width")
        kf = [kernel_f] * len(channels) if isinstance(kernel_f, int) else list(kernel_f)
        kt = [kernel_t] * len(channels) if isinstance(kernel_t, int) else list(kernel_t)
        if not len(kf) == len(kt) == len(channels):
            raise ValueError("kernel_f and kernel_t need one entry per layer in channels")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, (c, f, t) in enumerate(zip(channels, kf, kt)):
            layers.append(CausalConv2d(c_in, c, f, t))
            if i < len(channels) - 1:
                layers.append(_ACTIVATIONS[activation]())
            c_in = c
        self.layers = nn.Sequential(*layers)
        self.n_freq = n_freq
        self.in_channels = in_channels
        self.out_features = channels[-1] * n_freq
        self.receptive_field = 1 + sum(t - 1 for t in kt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # (B, F, T): one channel
            x = x.unsqueeze(1)
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] != self.n_freq:
            raise ValueError(f"expected stimuli (B, {self.in_channels}, {self.n_freq}, T), got {tuple(x.shape)}")
        h = self.layers(x)
        return h.flatten(1, 2)  # (B, C * F, T)


class NeuronReadout(nn.Module):
    """One linear head per global neuron id, then a softplus: a rate >= 0.

    ``forward(features)`` -> ``(B, N, 1, T)`` for all neurons;
    ``forward(features, neuron_index=ids)`` -> ``(B, len(ids), 1, T)``;
    ``forward(features, neuron_index=ids, item_index=items)`` -> ``(n_cells, T)``,
    cell ``c`` being neuron ``ids[c]`` on item ``items[c]``.
    """

    def __init__(self, n_neurons: int, in_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_neurons, in_features) / in_features ** 0.5 * 0.1)
        self.bias = nn.Parameter(torch.zeros(n_neurons))

    @property
    def n_neurons(self) -> int:
        return self.weight.shape[0]

    @torch.no_grad()
    def init_rates(self, mean_counts: torch.Tensor) -> None:
        """Set biases so that a zero drive predicts ``mean_counts`` per bin (inverse softplus)."""
        m = torch.as_tensor(mean_counts, dtype=self.bias.dtype).clamp(min=1e-4)
        self.bias.copy_(torch.where(m > 20, m, torch.log(torch.expm1(m))))

    def forward(self, features: torch.Tensor, neuron_index: torch.Tensor | Sequence[int] | None = None,
                item_index: torch.Tensor | None = None) -> torch.Tensor:
        if neuron_index is None:
            drive = torch.einsum("nd,bdt->bnt", self.weight, features) + self.bias[None, :, None]
            return F.softplus(drive).unsqueeze(2)
        ids = torch.as_tensor(neuron_index, dtype=torch.long)  # checked where it is (a host copy: no sync)
        _check_range("neuron ids", ids, self.n_neurons)
        ids = ids.to(features.device, non_blocking=True)
        if item_index is None:
            drive = torch.einsum("nd,bdt->bnt", self.weight[ids], features) + self.bias[ids][None, :, None]
            return F.softplus(drive).unsqueeze(2)
        items = torch.as_tensor(item_index, dtype=torch.long)
        if items.shape != ids.shape:
            raise ValueError(f"item_index {tuple(items.shape)} and neuron_index {tuple(ids.shape)} differ")
        items = items.cpu()
        _check_range("item_index (items of the batch)", items, features.shape[0])  # else a cell is dropped
        return F.softplus(self._cell_drive(features, ids, items.numpy()))

    def _cell_drive(self, features: torch.Tensor, ids: torch.Tensor, items: np.ndarray) -> torch.Tensor:
        """``(n_cells, T)`` drive: on an accelerator one batched product over every item's heads
        (padded to the item with most cells), elsewhere one product per item."""
        if cells.launch_bound(features.device):
            return self._padded_cell_drive(features, ids, items)
        order = np.argsort(items, kind="stable")
        in_order = bool((order == np.arange(len(order))).all())
        bounds = np.searchsorted(items[order], np.arange(features.shape[0] + 1))
        sorted_ids = ids if in_order else ids[torch.from_numpy(order).to(ids.device)]
        parts = [self.weight[sorted_ids[lo:hi]] @ features[b] + self.bias[sorted_ids[lo:hi]][:, None]
                 for b, (lo, hi) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())) if hi > lo]
        drive = torch.cat(parts) if parts else features.new_zeros((0, features.shape[-1]))
        if in_order:
            return drive
        return drive[torch.from_numpy(np.argsort(order)).to(ids.device)]

    def _padded_cell_drive(self, features: torch.Tensor, ids: torch.Tensor, items: np.ndarray) -> torch.Tensor:
        """The drive in a fixed handful of kernels whatever the batch: each cell's head goes to row
        ``(item, rank among the item's cells)`` of a ``(B, M, D)`` weight stack, one ``bmm`` with the
        ``(B, D, T)`` features, then the cells' rows are gathered back. On an accelerator a launch
        costs more than the padded rows' arithmetic (the per-item loop took ~4 launches per item
        forward and ~8 backward)."""
        n_items, n_features, T = features.shape
        if len(items) == 0:
            return features.new_zeros((0, T))
        per_item = np.bincount(items, minlength=n_items)
        rows = int(per_item.max())
        order = np.argsort(items, kind="stable")
        rank = np.empty(len(items), dtype=np.int64)
        rank[order] = np.arange(len(items)) - np.repeat(np.cumsum(per_item) - per_item, per_item)
        slot = torch.from_numpy(items.astype(np.int64) * rows + rank).to(features.device, non_blocking=True)
        heads = features.new_zeros((n_items * rows, n_features)).index_put((slot,), self.weight[ids])
        drive = torch.bmm(heads.view(n_items, rows, n_features), features).view(n_items * rows, T)
        return drive[slot] + self.bias[ids][:, None]


def _check_range(what: str, index: torch.Tensor, size: int) -> None:
    """Raise an IndexError unless every entry of ``index`` is in ``[0, size)`` (a host tensor: no sync)."""
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
        raise IndexError(f"{what} must be in [0, {size}), got range [{int(index.min())}, {int(index.max())}]")


class PooledEncodingModel(NeuralModel):
    """Shared time-causal conv backbone + per-neuron linear-softplus heads.

    ``out_neurons`` is the number of neurons of the whole pool (global ids
    ``0..O-1``). Predictions are expected spike counts per bin.

    - ``model(stims)`` -> ``(B, O, 1, T)`` (deepSTRF's shape);
    - ``model(stims, neuron_index=ids)`` -> ``(B, len(ids), 1, T)``, e.g.
      for a dense batch over ``ds.selected_neurons()``;
    - ``model.predict(batch)``: per-cell ``(n_cells, T)`` for a
      :class:`CompactBatch`, ``(B, N_sel, 1, T)`` for a dense dict batch
      (pass ``neurons``).
    """

    def __init__(self, out_neurons: int = 1, n_freq: int = 32, in_channels: int = 1,
                 channels: Sequence[int] = (8,), kernel_f: Sequence[int] | int = 5,
                 kernel_t: Sequence[int] | int = 12, activation: str = "elu"):
        super().__init__(out_neurons)
        self.config = {"out_neurons": out_neurons, "n_freq": n_freq, "in_channels": in_channels,
                       "channels": list(channels), "kernel_f": kernel_f, "kernel_t": kernel_t,
                       "activation": activation}
        self.core = CausalConvBackbone(n_freq, in_channels, channels, kernel_f, kernel_t, activation)
        self.readout = NeuronReadout(out_neurons, self.core.out_features)
        self.validate()

    def forward(self, stimulus: torch.Tensor, neuron_index=None, item_index=None) -> torch.Tensor:
        x = self.prefiltering(self.wav2spec(stimulus))
        return self.readout(self.core(x), neuron_index, item_index)

    def predict(self, batch, neurons: Sequence[int] | None = None) -> torch.Tensor:
        """Rates for a batch: per valid cell for a CompactBatch, dense otherwise."""
        if isinstance(batch, CompactBatch):  # the host copies of the index arrays: no read-back from a device
            host = batch.host_index()
            return self(batch.stims, host["neuron_index"], host["item_index"])
        return self(batch["stims"], neurons)
