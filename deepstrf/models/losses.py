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
    if not bool(valid.any()):
        return pred.sum() * 0.0
    y = torch.where(valid, responses, torch.zeros((), dtype=responses.dtype)).to(pred.dtype)
    lam = pred.expand_as(responses)
    nll = lam - y * torch.log(lam + eps)
    return (nll * valid).sum() / valid.sum()


def poisson_loss_compact(pred: torch.Tensor, batch: CompactBatch, eps: float = EPS,
                         reduction: str = "mean") -> torch.Tensor:
    """Mean Poisson NLL of per-cell rates ``pred`` ``(n_cells, T')`` on a compact batch.

    Only the bins ``t < lengths[c]`` of each cell count; with
    ``reduction="sum"`` the total over observations is returned, with
    ``"none"`` the per-cell sums ``(n_cells,)``.
    """
    if pred.dim() != 2 or pred.shape[0] != batch.n_cells:
        raise ValueError(f"pred must be (n_cells={batch.n_cells}, T), got {tuple(pred.shape)}")
    ysum = batch.repeat_sum(pred.dtype).to(pred.device)
    T = ysum.shape[1]
    if pred.shape[1] < T:
        raise ValueError(f"prediction covers {pred.shape[1]} bins, cells need {T}")
    lam = pred[:, :T]
    mask = batch.time_mask().to(pred.device)
    R = batch.repeats.to(device=pred.device, dtype=pred.dtype)[:, None]
    per_bin = (R * lam - ysum * torch.log(lam + eps)) * mask
    per_cell = per_bin.sum(dim=1)
    if reduction == "none":
        return per_cell
    if reduction == "sum":
        return per_cell.sum()
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    n_obs = (batch.repeats * batch.lengths).sum().clamp(min=1).to(pred.dtype)
    return per_cell.sum() / n_obs


def masked_poisson_loss(model_out: torch.Tensor, batch, eps: float = EPS) -> torch.Tensor:
    """Dispatch on the batch format: :class:`CompactBatch` or a dense dict."""
    if isinstance(batch, CompactBatch):
        return poisson_loss_compact(model_out, batch, eps)
    return poisson_loss_dense(model_out, batch["responses"], batch.get("valid_mask"), eps)
