"""CompactBatch operations on whole tensors, against straightforward per-cell definitions."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from toydata import ToyAudio

from deepstrf.datasets.collate import CompactBatch, compact_collate, neural_collate
from deepstrf.metrics import NeuronScores
from deepstrf.models import poisson_loss_compact
from deepstrf.stream import StreamingNeuralDataset
from deepstrf.utils.data import concat_neural_datasets

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# -- the definitions, one cell at a time ------------------------------------------------
def cell(b: CompactBatch, c: int) -> torch.Tensor:
    r, t = int(b.repeats[c]), int(b.lengths[c])
    return b.values[int(b.offsets[c]):int(b.offsets[c + 1])].view(r, t)


def ref_repeat_sum(b: CompactBatch, dtype=torch.float32) -> torch.Tensor:
    T = int(b.lengths.max()) if b.n_cells else 0
    out = torch.zeros((b.n_cells, T), dtype=dtype)
    for c in range(b.n_cells):
        out[c, :int(b.lengths[c])] = cell(b, c).sum(dim=0, dtype=dtype)
    return out


def ref_padded(b: CompactBatch, dtype=torch.float32) -> torch.Tensor:
    R = int(b.repeats.max()) if b.n_cells else 0
    T = int(b.lengths.max()) if b.n_cells else 0
    out = torch.full((b.n_cells, R, T), float("nan"), dtype=dtype)
    for c in range(b.n_cells):
        out[c, :int(b.repeats[c]), :int(b.lengths[c])] = cell(b, c)
    return out


def ref_time_mask(b: CompactBatch) -> torch.Tensor:
    T = int(b.lengths.max()) if b.n_cells else 0
    out = torch.zeros((b.n_cells, T), dtype=torch.bool)
    for c in range(b.n_cells):
        out[c, :int(b.lengths[c])] = True
    return out


def ref_to_dense(b: CompactBatch, neurons: list[int]) -> dict:
    pos = {n: p for p, n in enumerate(neurons)}
    missing = b.n_cells < b.batch_size * len(neurons)
    R = max(int(b.repeats.max()) if b.n_cells else 0, int(missing))
    T = max(int(b.lengths.max()) if b.n_cells else 0, int(missing))
    out = torch.full((b.batch_size, len(neurons), R, T), float("nan"))
    for c in range(b.n_cells):
        out[int(b.item_index[c]), pos[int(b.neuron_index[c])], :int(b.repeats[c]), :int(b.lengths[c])] = cell(b, c)
    return {"stims": b.stims, "responses": out, "valid_mask": ~out.isnan(), "stim_meta": b.stim_meta}


def ref_loss(pred: torch.Tensor, b: CompactBatch, eps: float = 1e-8) -> torch.Tensor:
    total = pred.new_zeros(())
    for c in range(b.n_cells):
        t = int(b.lengths[c])
        lam = pred[c, :t]
        y = cell(b, c).to(pred.dtype)
        total = total + (lam - y * torch.log(lam + eps)).sum()
    return total / max(int((b.repeats * b.lengths).sum()), 1)


# -- batches ---------------------------------------------------------------------------
def make_batch(shapes: list[tuple[int, int]], dtype: torch.dtype, seed: int = 0, items: int = 3) -> CompactBatch:
    """Cells of the given ``(R, T)`` shapes, in that order, spread over ``items`` items."""
    g = torch.Generator().manual_seed(seed)
    cells = [torch.poisson(torch.full((r, t), 1.5), generator=g) for r, t in shapes]
    if not dtype.is_floating_point:
        cells = [c.clamp(max=torch.iinfo(dtype).max).to(dtype) for c in cells]
    else:
        cells = [c.to(dtype) + 0.25 for c in cells]
    sizes = torch.tensor([0] + [c.numel() for c in cells], dtype=torch.int64)
    n = len(shapes)
    T = max([t for _, t in shapes], default=4)
    return CompactBatch(
        stims=torch.randn(items, 1, 3, T, generator=g),
        values=torch.cat([c.reshape(-1) for c in cells]) if cells else torch.zeros(0, dtype=dtype),
        offsets=sizes.cumsum(0), repeats=torch.tensor([r for r, _ in shapes], dtype=torch.int64),
        lengths=torch.tensor([t for _, t in shapes], dtype=torch.int64),
        item_index=torch.arange(n, dtype=torch.int64) * items // max(n, 1),
        neuron_index=torch.arange(n, dtype=torch.int64) * 2 + 1,
        stim_lengths=torch.full((items,), T, dtype=torch.int64), stim_meta=[{"i": i} for i in range(items)])


RAGGED = [(3, 7), (3, 7), (2, 9), (3, 7), (1, 4), (2, 0), (2, 9), (2, 9), (5, 1), (3, 7), (0, 3), (4, 6), (2, 0)]
RUNS = [(10, 20)] * 5 + [(10, 23)] * 4 + [(8, 23)] * 3  # one run per shape: views, no gather


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.float32])
@pytest.mark.parametrize("shapes", [RAGGED, RUNS, [(2, 5)], []], ids=["ragged", "runs", "one", "empty"])
def test_operations_equal_the_per_cell_definitions(shapes, dtype):
    b = make_batch(shapes, dtype)
    exact = not dtype.is_floating_point
    check = torch.equal if exact else (lambda x, y: torch.allclose(x, y, equal_nan=True))
    for out_dtype in (torch.float32, torch.float64):
        assert check(b.repeat_sum(out_dtype), ref_repeat_sum(b, out_dtype))
        assert b.repeat_sum(out_dtype).dtype == out_dtype
    assert torch.equal(b.padded(), ref_padded(b)) or torch.allclose(b.padded(), ref_padded(b), equal_nan=True)
    assert b.padded(torch.float64).dtype == torch.float64
    assert torch.equal(b.time_mask(), ref_time_mask(b))
    assert b.n_observations() == int((b.repeats * b.lengths).sum())
    assert torch.allclose(b.psth(), ref_repeat_sum(b) / b.repeats[:, None].float(), equal_nan=True)
    neurons = list(range(2 * len(shapes) + 3))[::-1]
    assert dense_equal(b.to_dense(neurons), ref_to_dense(b, neurons))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16])
def test_repeat_sums_of_large_counts_are_exact(dtype):
    """Integer counts are summed in an integer type wide enough for their sum (here beyond int16)."""
    b = make_batch([(200, 3), (3, 4), (200, 3)], dtype)
    b.values.fill_(torch.iinfo(dtype).max)
    expected = ref_repeat_sum(b, torch.float64)
    assert expected.max() == 200 * torch.iinfo(dtype).max
    assert torch.equal(b.repeat_sum(torch.float64), expected)


@pytest.mark.parametrize("shapes", [RAGGED, RUNS, []], ids=["ragged", "runs", "empty"])
def test_compact_loss_and_its_gradient_equal_the_per_cell_definition(shapes):
    b = make_batch(shapes, torch.uint8, seed=3)
    g = torch.Generator().manual_seed(1)
    base = torch.rand((b.n_cells, b.plan().max_length + 2), generator=g, dtype=torch.float64) + 0.1
    pred, ref_pred = base.clone().requires_grad_(), base.clone().requires_grad_()
    loss, ref = poisson_loss_compact(pred, b), ref_loss(ref_pred, b)
    assert torch.allclose(loss, ref)
    if b.n_cells:
        loss.backward()
        ref.backward()
        assert torch.allclose(pred.grad, ref_pred.grad)


@pytest.mark.parametrize("shapes", [RAGGED, RUNS, []], ids=["ragged", "runs", "empty"])
def test_the_accelerator_strategy_equals_the_per_cell_definitions(shapes, monkeypatch):
    """What runs on a GPU (one reduction per shape group, the loss over padded repeat sums with
    autograd's backward), run here on the CPU."""
    from deepstrf.datasets import cells
    monkeypatch.setattr(cells, "launch_bound", lambda device: True)
    b = make_batch(shapes, torch.uint8, seed=3)
    for out_dtype in (torch.float32, torch.float64):
        assert torch.equal(b.repeat_sum(out_dtype), ref_repeat_sum(b, out_dtype))
    base = torch.rand((b.n_cells, b.plan().max_length + 2), dtype=torch.float64) + 0.1
    pred, ref_pred = base.clone().requires_grad_(), base.clone().requires_grad_()
    loss, ref = poisson_loss_compact(pred, b), ref_loss(ref_pred, b)
    assert torch.allclose(loss, ref)
    assert torch.allclose(poisson_loss_compact(pred, b, reduction="sum"), ref * max(b.n_observations(), 1))
    if b.n_cells:
        loss.backward()
        ref.backward()
        assert torch.allclose(pred.grad, ref_pred.grad)
    large = make_batch([(200, 3), (3, 4), (200, 3)], torch.int16)  # sums beyond int16, within float32's 2**24
    large.values.fill_(torch.iinfo(torch.int16).max)
    for out_dtype in (torch.float16, torch.float32, torch.float64):
        assert torch.equal(large.repeat_sum(out_dtype), ref_repeat_sum(large, torch.float64).to(out_dtype))


def test_operations_read_no_index_array_of_the_batch_per_cell():
    """The plan comes from the host index arrays: a batch whose device-side index arrays were
    replaced by garbage after planning still computes from its plan (nothing read per cell)."""
    b = make_batch(RAGGED, torch.uint8)
    expected = b.repeat_sum()
    b.plan()
    b.offsets = torch.full_like(b.offsets, -1)
    assert torch.equal(b.repeat_sum(), expected)


def test_a_batch_pickles_without_its_plan_and_plans_again():
    b = make_batch(RAGGED, torch.uint8)  # (torch 2.13 cannot pickle a uint16 tensor: its own bug)
    b.plan()
    again = pickle.loads(pickle.dumps(b))
    assert "_plan" not in again.__dict__ and torch.equal(again.repeat_sum(), b.repeat_sum())


@pytest.fixture
def pool():
    return concat_neural_datasets([ToyAudio(1, S=4, N=5), ToyAudio(2, S=3, N=6)], names=["A", "B"])


def dense_equal(a: dict, b: dict) -> bool:
    return (torch.equal(a["stims"], b["stims"]) and a["responses"].dtype == b["responses"].dtype
            and torch.equal(a["responses"].nan_to_num(-1), b["responses"].nan_to_num(-1))
            and torch.equal(a["valid_mask"], b["valid_mask"]) and a["stim_meta"] == b["stim_meta"])


@pytest.mark.parametrize("picks", [[0, 6, 2], [1], [5, 4, 3, 2, 1, 0]])
def test_to_dense_equals_neural_collate_of_the_items(pool, picks):
    """Items of a pool with missing pairs (cross-source, and every 4th pair within a source),
    R varying per neuron: NaN sentinels, padding, valid_mask, zero-padded stims, stim_meta."""
    items = [pool[i] for i in picks]
    ids = pool.selected_neurons()
    dense = compact_collate(items, neuron_index=ids).to_dense(ids)
    assert dense_equal(dense, neural_collate(items))
    # a selection: dense over the selected neurons, in selection order
    pool.select_population([9, 2, 7])
    items = [pool[i] for i in range(len(pool))][::-1]
    assert dense_equal(compact_collate(items, neuron_index=pool.selected_neurons()).to_dense([9, 2, 7]),
                       neural_collate(items))
    assert dense_equal(compact_collate(items).to_dense(range(3)), neural_collate(items))


def test_to_dense_of_streamed_batches_equals_the_streamed_dense_batches(pool):
    kw = dict(batch_size=3, shuffle=True, seed=2)
    compact = list(StreamingNeuralDataset(pool, collate="compact", **kw))
    dense = list(StreamingNeuralDataset(pool, collate="dense", **kw))
    assert len(compact) == len(dense) == 3
    for c, d in zip(compact, dense):
        assert c.values.dtype == torch.float32 or not c.values.dtype.is_floating_point
        assert dense_equal(c.to_dense(pool.selected_neurons()), d)


def test_to_dense_refuses_neurons_outside_the_axis(pool):
    b = compact_collate([pool[0]], neuron_index=pool.selected_neurons())
    with pytest.raises(ValueError, match=r"neurons \[4\] that are not in `neurons`.*selected_neurons"):
        b.to_dense([0, 1, 2])


def test_scores_of_a_compact_batch_equal_those_of_its_per_cell_padding(pool):
    items = [pool[i] for i in range(len(pool))]
    b = compact_collate(items, neuron_index=pool.selected_neurons())
    pred = b.psth() * 0.8 + 0.1
    a, r = NeuronScores(pool.N_neurons, n_splits=4), NeuronScores(pool.N_neurons, n_splits=4)
    a.update_compact(b, pred)
    r.update(b.neuron_index, pred, ref_padded(b, torch.float64), b.repeats, b.lengths)
    for key, value in a.result().items():
        np.testing.assert_array_equal(value, r.result()[key])


@needs_cuda
@pytest.mark.parametrize("shapes", [RAGGED, RUNS, []], ids=["ragged", "runs", "empty"])
def test_operations_on_cuda_equal_those_on_the_host(shapes):
    b = make_batch(shapes, torch.uint8)
    pinned = b.pin_memory()
    assert (not b.n_cells or pinned.values.is_pinned()) and torch.equal(pinned.repeat_sum(), b.repeat_sum())
    on = pinned.to("cuda")
    assert on.values.is_cuda and all(g.starts is None or g.starts.is_cuda for g in on.plan().groups)
    assert torch.equal(on.repeat_sum().cpu(), b.repeat_sum())
    assert torch.equal(on.padded().cpu().nan_to_num(-1), b.padded().nan_to_num(-1))
    assert torch.equal(on.time_mask().cpu(), b.time_mask())
    pred = torch.rand((b.n_cells, b.plan().max_length), dtype=torch.float64) + 0.1
    assert torch.allclose(poisson_loss_compact(pred.cuda(), on).cpu(), poisson_loss_compact(pred, b))
    assert torch.allclose(poisson_loss_compact(pred.cuda(), b).cpu(), poisson_loss_compact(pred, b))  # moved
    ids = range(int(b.neuron_index.max()) + 1 if b.n_cells else 1)
    d, h = on.to_dense(ids), b.to_dense(ids)
    assert d["responses"].is_cuda and dense_equal({k: v.cpu() if torch.is_tensor(v) else v for k, v in d.items()}, h)
