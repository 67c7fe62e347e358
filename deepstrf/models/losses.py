"""Masked Poisson losses over valid cells only.

Both forms compute the same number: the mean over every observed
(cell, repeat, bin) of the Poisson negative log-likelihood without its
``log y!`` constant, ``lambda - y log lambda``. Missing pairs (NaN sentinels,
padding) never enter it.

- :func:`poisson_loss_dense` takes a :func:`neural_collate` batch:
  predictions ``(B, N, 1, T)``, responses ``(B, N, R, T)`` and ``valid_mask``.
- :func:`poisson_loss_compact` takes per-cell predictions ``(n_cells, T)``
  and a :class:`CompactBatch`; it uses ``repeats`` and ``repeat_sum()`` as
  sufficient statistics: ``sum_t R lambda_t - (sum_r y_rt) log lambda_t``.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..datasets import cells
from ..datasets.cells import empty
from ..datasets.collate import CompactBatch

EPS = 1e-8


def poisson_loss_dense(pred: torch.Tensor, responses: torch.Tensor, valid_mask: torch.Tensor | None = None,
                       eps: float = EPS) -> torch.Tensor:
    """Mean Poisson NLL over the valid entries of a dense batch.

    ``pred`` is a rate ``(B, N, 1, T')`` (or ``(B, N, T')``) with ``T' >= T``;
    ``responses`` ``(B, N, R, T)``; ``valid_mask`` defaults to
    ``~isnan(responses)`` and is combined with it (NaN never enters).
    """
    if pred.dim() == 3:
        pred = pred.unsqueeze(2)
    T = responses.shape[-1]
    if pred.shape[-1] < T:
        raise ValueError(f"prediction covers {pred.shape[-1]} bins, responses {T}")
    pred = pred[..., :T]
    valid = ~responses.isnan()
    if valid_mask is not None:
        valid = valid & valid_mask
    y = torch.where(valid, responses, torch.zeros((), dtype=responses.dtype)).to(pred.dtype)
    lam = pred.expand_as(responses)
    nll = lam - y * torch.log(lam + eps)
    # no valid entry: 0, with a graph (clamped count rather than a test, which would read back from a device)
    return (nll * valid).sum() / valid.sum().clamp(min=1)


def poisson_loss_compact(pred: torch.Tensor, batch: CompactBatch, eps: float = EPS,
                         reduction: str = "mean") -> torch.Tensor:
    """Mean Poisson NLL of per-cell rates ``pred`` ``(n_cells, T')`` on a compact batch.

    Only the bins ``t < lengths[c]`` of each cell count; with
    ``reduction="sum"`` the total over observations is returned, with
    ``"none"`` the per-cell sums ``(n_cells,)``. On a CPU it is computed one
    group of same-shaped cells at a time, from the counts as stored, with a
    backward of its own (a few passes over the predictions, no per-cell work);
    on an accelerator, over the padded repeat sums in a few whole-batch
    operations (fewer kernel launches).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if batch.values.device != pred.device:
        batch = batch.to(pred.device)
    batch.check_rates(pred)
    if cells.launch_bound(pred.device):
        per_cell = _padded_poisson_nll(pred, batch, eps)
    else:
        per_cell = _CompactPoissonNLL.apply(pred, batch, eps)
    if reduction == "none":
        return per_cell
    if reduction == "sum":
        return per_cell.sum()
    return per_cell.sum() / max(batch.n_observations(), 1)


class _CompactPoissonNLL(torch.autograd.Function):
    """Per-cell ``sum_t<len R lambda - ysum log(lambda + eps)``; its gradient is
    ``R - ysum / (lambda + eps)`` inside each cell's length, zero elsewhere."""

    @staticmethod
    def forward(ctx, pred: torch.Tensor, batch: CompactBatch, eps: float) -> torch.Tensor:
        plan = batch.plan()
        out = pred.new_zeros(plan.n_cells)
        sums = []
        for g in plan.groups:
            ysum = batch.group_repeat_sum(g, pred.dtype, exact=True)  # integer counts stay integers
            lam = _rates(pred, g)
            out[g.cells] = g.repeats * lam.sum(1) - (lam + eps).log_().mul_(ysum).sum(1)
            sums.append(ysum)
        ctx.save_for_backward(pred)
        ctx.plan, ctx.sums, ctx.eps = plan, sums, eps
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (pred,) = ctx.saved_tensors
        grad = empty(tuple(pred.shape), pred.dtype, pred.device)
        for g, ysum in zip(ctx.plan.groups, ctx.sums):  # every cell is in one group: each row written once
            part = _rates(pred, g) + ctx.eps
            repeats = torch.full((1, 1), float(g.repeats), dtype=pred.dtype, device=pred.device)
            torch.addcdiv(repeats, ysum, part, value=-1, out=part)  # R - ysum / (lambda + eps)
            grad[g.cells, :g.length] = part.mul_(grad_out[g.cells][:, None])
            grad[g.cells, g.length:] = 0
        return grad, None, None


def _padded_poisson_nll(pred: torch.Tensor, batch: CompactBatch, eps: float) -> torch.Tensor:
    """The per-cell NLL over the batch's ``(n_cells, T_max)`` padded repeat sums, in a few whole-batch
    operations that autograd differentiates. On an accelerator each kernel launch costs more than
    the padding's bytes, so this beats a few operations per shape group."""
    lam = pred[:, :batch.plan().max_length]
    inside = batch.time_mask()
    lam = torch.where(inside, lam, 1.0)  # bins past a cell's length neither count nor carry a gradient
    ysum = batch.repeat_sum(pred.dtype)  # zero past each cell's length
    nll = batch.repeats.to(pred.dtype)[:, None] * lam - ysum * torch.log(lam + eps)
    return torch.where(inside, nll, 0.0).sum(1)


def _rates(pred: torch.Tensor, group) -> torch.Tensor:
    """The rows of ``pred`` of a group's cells, over their length."""
    rows = pred[group.cells] if group.starts is None else pred.index_select(0, group.cells)
    return rows[:, :group.length]


def masked_poisson_loss(model_out: torch.Tensor, batch, eps: float = EPS) -> torch.Tensor:
    """Dispatch on the batch format: :class:`CompactBatch` or a dense dict."""
    if isinstance(batch, CompactBatch):
        return poisson_loss_compact(model_out, batch, eps)
    return poisson_loss_dense(model_out, batch["responses"], batch.get("valid_mask"), eps)
