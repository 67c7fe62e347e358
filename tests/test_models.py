"""Models: the deepSTRF NeuralModel base, the pooled model, the masked Poisson losses."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
from torch import nn

from deepstrf.datasets import cells
from deepstrf.datasets.collate import compact_collate, neural_collate
from deepstrf.datasets.synthetic import SyntheticAudioDataset
from deepstrf.models import (CausalConv2d, CausalConvBackbone, NeuralModel,
                             PooledEncodingModel, masked_poisson_loss, poisson_loss_compact, poisson_loss_dense)
from deepstrf.models.neural_model import NeuralModel as NeuralModelAtPath
from deepstrf.models.pooled import NeuronReadout


@pytest.fixture(scope="module")
def pool():
    a = SyntheticAudioDataset("aa1", scale=0.1, time_scale=0.02, seed=1)
    b = SyntheticAudioDataset("aa2", scale=0.05, time_scale=0.03, seed=2)
    return a + b


def test_neural_model_base_contract():
    assert NeuralModelAtPath is NeuralModel
    m = NeuralModel()
    assert m.O == 1
    assert NeuralModel(out_neurons=7).O == 7
    assert m.count_trainable_params() == 0
    with pytest.raises(NotImplementedError, match="readout"):
        m(torch.zeros(1, 4, 5))
    with pytest.raises(AssertionError):
        m.validate()
    with pytest.raises(ValueError):
        NeuralModel(out_neurons=0).validate()


def test_neural_model_subclass_with_readout():
    class Lin(NeuralModel):
        def __init__(self, out_neurons=3, F=4):
            super().__init__(out_neurons)
            self.readout = nn.Conv1d(F, out_neurons, 1)

    m = Lin()
    m.validate()
    assert m.count_trainable_params() == 3 * 4 + 3
    assert m(torch.zeros(2, 4, 6)).shape == (2, 3, 6)
    m.readout.weight.requires_grad_(False)
    assert m.count_trainable_params() == 3


def test_backbone_is_time_causal():
    torch.manual_seed(0)
    core = CausalConvBackbone(n_freq=6, channels=(4, 3), kernel_f=3, kernel_t=(5, 4))
    x = torch.randn(2, 1, 6, 30)
    y = x.clone()
    y[..., 17:] = torch.randn_like(y[..., 17:])
    fx, fy = core(x), core(y)
    assert fx.shape == (2, 3 * 6, 30)
    assert torch.allclose(fx[..., :17], fy[..., :17])
    assert not torch.allclose(fx[..., 17:], fy[..., 17:])
    assert core.receptive_field == 8


def test_causal_conv_rejects_even_frequency_kernel():
    with pytest.raises(ValueError, match="odd"):
        CausalConv2d(1, 2, kernel_f=4, kernel_t=3)


@pytest.mark.parametrize("accelerator", [False, True])  # the per-item products, or one padded bmm
def test_heads_indexed_by_global_neuron_id(pool, accelerator, monkeypatch):
    monkeypatch.setattr(cells, "launch_bound", lambda device: accelerator)
    torch.manual_seed(0)
    model = PooledEncodingModel(pool.N_neurons, n_freq=pool.F, channels=(4,), kernel_t=5)
    assert isinstance(model, NeuralModel) and model.O == pool.N_neurons
    items = [pool[i] for i in range(len(pool))]
    cb = compact_collate(items, neuron_index=pool.selected_neurons())
    per_cell = model.predict(cb)
    dense_all = model(cb.stims)  # (B, O, 1, T)
    assert dense_all.shape == (cb.batch_size, pool.N_neurons, 1, cb.stims.shape[-1])
    expected = dense_all[cb.item_index, cb.neuron_index, 0]
    assert per_cell.shape == (cb.n_cells, cb.stims.shape[-1])
    assert torch.allclose(per_cell, expected, atol=1e-6)
    assert (per_cell >= 0).all()
    # only the heads of neurons present get gradients
    poisson_loss_compact(per_cell, cb).backward()
    used = torch.zeros(pool.N_neurons, dtype=torch.bool)
    used[cb.neuron_index] = True
    grad = model.readout.weight.grad.abs().sum(1)
    assert (grad[used] > 0).all() and (grad[~used] == 0).all()
    with pytest.raises(IndexError):
        model(cb.stims, neuron_index=[pool.N_neurons])
    # a cell of an item beyond the batch is refused (the per-item product dropped it on a CPU)
    B = cb.batch_size
    bad = dataclasses.replace(cb, item_index=torch.where(cb.item_index == B - 1, B, cb.item_index))
    with pytest.raises(IndexError, match=rf"item_index \(items of the batch\) must be in \[0, {B}\)"):
        model.predict(bad)
    with pytest.raises(IndexError, match="item_index"):
        model(cb.stims, cb.neuron_index, -cb.item_index - 1)
    # cells in any order, items given on the host or as tensors
    perm = torch.randperm(cb.n_cells, generator=torch.Generator().manual_seed(3))
    shuffled = model(cb.stims, cb.neuron_index[perm], cb.item_index[perm].numpy())
    assert torch.allclose(shuffled, expected[perm], atol=1e-6)


@pytest.mark.parametrize("items", [[2, 0, 0, 2, 2, 1, 0], [0, 0, 2, 2], []])  # unsorted; an item without cells
def test_the_padded_cell_drive_of_accelerators_equals_the_per_item_one(items):
    """On an accelerator the heads of all items run as one batched product; same values and
    gradients as one product per item (what a CPU runs)."""
    torch.manual_seed(4)
    readout = NeuronReadout(n_neurons=6, in_features=5)
    features = torch.randn(3, 5, 11, requires_grad=True)
    items = np.array(items, dtype=np.int64)
    ids = torch.tensor([5, 1, 3, 0, 2, 4, 1][:len(items)], dtype=torch.long)
    results = []
    for drive in (readout._cell_drive, readout._padded_cell_drive):
        readout.zero_grad(set_to_none=True)
        features.grad = None
        out = drive(features, ids, items)
        if len(items):
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out.detach()] + [t.grad for t in (readout.weight, readout.bias, features)])
    for per_item, padded in zip(*results):
        if per_item is None:  # no cells: no gradient either way
            assert padded is None
            continue
        assert per_item.shape == padded.shape and torch.allclose(per_item, padded, atol=1e-6)


def test_dense_and_compact_losses_agree(pool):
    torch.manual_seed(1)
    model = PooledEncodingModel(pool.N_neurons, n_freq=pool.F, channels=(3,), kernel_t=4)
    items = [pool[i] for i in range(len(pool))]
    ids = pool.selected_neurons()
    dense = neural_collate(items)
    cb = compact_collate(items, neuron_index=ids)
    ld = masked_poisson_loss(model.predict(dense, neurons=ids), dense)
    lc = masked_poisson_loss(model.predict(cb), cb)
    assert torch.isfinite(ld) and torch.isclose(ld, lc, rtol=1e-5)
    assert dense["responses"].isnan().any()  # the dense batch does hold sentinels/padding


def test_compact_loss_uses_repeat_sums():
    # one cell, 2 repeats x 3 bins; loss = (R*lam - sum_r y log lam) summed / (R*T)
    from deepstrf.datasets.collate import CompactBatch

    y = torch.tensor([[0, 1, 2], [1, 1, 0]], dtype=torch.int16)
    cb = CompactBatch(stims=torch.zeros(1, 1, 2, 3), values=y.reshape(-1), offsets=torch.tensor([0, 6]),
                      repeats=torch.tensor([2]), lengths=torch.tensor([3]), item_index=torch.tensor([0]),
                      neuron_index=torch.tensor([0]), stim_lengths=torch.tensor([3]), stim_meta=[{}])
    lam = torch.tensor([[0.5, 1.0, 2.0]])
    want = sum(float(lam[0, t] - y[r, t] * torch.log(lam[0, t])) for r in range(2) for t in range(3)) / 6
    assert poisson_loss_compact(lam, cb).item() == pytest.approx(want, rel=1e-5)
    assert poisson_loss_compact(lam, cb, reduction="sum").item() == pytest.approx(want * 6, rel=1e-5)


def test_dense_loss_ignores_nan_and_mask():
    pred = torch.full((1, 2, 1, 3), 1.0)
    resp = torch.tensor([[[[1.0, 0.0, float("nan")]], [[float("nan"), float("nan"), float("nan")]]]])
    loss = poisson_loss_dense(pred, resp)
    assert loss.item() == pytest.approx(1.0)  # lam - y log lam with lam = 1: 1 per valid entry
    assert poisson_loss_dense(pred, torch.full((1, 2, 1, 3), float("nan"))).item() == 0.0


def test_training_reduces_loss_on_pool(pool):
    torch.manual_seed(0)
    model = PooledEncodingModel(pool.N_neurons, n_freq=pool.F, channels=(4,), kernel_t=5)
    items = [pool[i] for i in range(len(pool))]
    collate = functools.partial(compact_collate, neuron_index=pool.selected_neurons())
    cb = collate(items)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = poisson_loss_compact(model.predict(cb), cb)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
