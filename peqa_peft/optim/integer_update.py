"""IntLion's update of an integer weight, written against a small protocol of the weight type.

An *integer row weight* is any tensor-like object with

- ``codes``: ``(out, in)`` integer codes in ``[0, 255]`` (8-bit), updated in place;
- ``scale``, ``zero_point``: ``(out, 1)`` float per-row grid, ``W = scale * (codes - zero_point)``;
- ``outlier_idx`` (sorted flat indices; padding slots past every row) and ``outlier_val`` (float32 values): entries
  kept exactly in float, whose code holds the zero point;
- ``outlier_range(r0, r1) -> (lo, hi)``: the slice of ``outlier_idx`` that falls in rows ``r0:r1``;
- ``num_outliers``, ``shape``, ``dequantize(dtype)`` and ``refresh_every`` (steps between outlier re-selections,
  0 for never).

QFT's :class:`~peqa_peft.core.qft.tensor.QftWeight` is one; it does not know this module. :class:`IntLion` updates
every parameter for which :func:`is_integer_weight` holds with :func:`lion_update_rows_`, chunk by chunk, and calls
:func:`reselect_outliers_` every ``refresh_every`` steps.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..core.chunks import row_chunks
from ..core.stochastic import stochastic_round

_MAXQ = 255  # the largest 8-bit code
PROTOCOL = ("codes", "scale", "zero_point", "outlier_idx", "outlier_val", "outlier_range")


def is_integer_weight(p: torch.Tensor) -> bool:
    """Whether ``p`` is an integer row weight (see the module docstring) that IntLion updates in its codes."""
    return all(hasattr(p, name) for name in PROTOCOL)


@torch.no_grad()
def lion_update_(
    weight, direction: torch.Tensor, lr: float, weight_decay: float, generator: Optional[torch.Generator]
) -> None:
    """``W <- W - lr * (direction + weight_decay * W)`` on the whole weight (see :func:`lion_update_rows_`)."""
    for r0, r1 in row_chunks(weight.shape[0], weight.shape[1]):
        lion_update_rows_(weight, r0, r1, direction[r0:r1], lr, weight_decay, generator)


@torch.no_grad()
def lion_update_rows_(
    weight,
    r0: int,
    r1: int,
    direction: torch.Tensor,
    lr: float,
    weight_decay: float,
    generator: Optional[torch.Generator],
) -> None:
    """Apply ``W <- W - lr * (direction + weight_decay * W)`` to rows ``r0:r1`` (``direction``: those rows).

    In code units the dense update is ``-(lr / s) * direction - lr * weight_decay * (q - z)`` per entry; it is
    stochastically rounded to whole steps (unbiased, so sub-step learning rates still move weights on average).
    A row whose updated codes would leave ``[0, 255]`` first gets a wider grid (:func:`refit_overflowing_rows_`), so
    no update is lost to clamping at the edges. Outliers take the same update exactly, in float. Called on
    consecutive row ranges, the rounding noise drawn from ``generator`` is the same as for one call on the whole
    weight.
    """
    codes = weight.codes[r0:r1].float()
    update = direction.float() * (-lr / weight.scale[r0:r1])
    if weight_decay:
        update.add_(codes - weight.zero_point[r0:r1], alpha=-lr * weight_decay)
    update.add_(codes)  # the updated weight in (fractional) code units
    lo, hi = weight.outlier_range(r0, r1)
    local = weight.outlier_idx[lo:hi].long() - r0 * weight.shape[1] if hi > lo else None
    if local is not None:  # outlier slots hold the zero point; their value lives in float
        update.view(-1)[local] = weight.zero_point[r0:r1].expand_as(update).reshape(-1)[local]
    refit_overflowing_rows_(weight, r0, update)
    codes = stochastic_round(update, generator).clamp_(0, _MAXQ)
    if local is not None:
        outliers = weight.outlier_val[lo:hi]
        outliers.mul_(1.0 - lr * weight_decay).sub_(direction.reshape(-1)[local].float(), alpha=lr)
    weight.codes[r0:r1].copy_(codes)


@torch.no_grad()
def refit_overflowing_rows_(weight, r0: int, update: torch.Tensor) -> None:
    """Widen the grid of every row whose updated codes ``update`` (rows ``r0:``) leave ``[0, 255]``.

    Without this an edge code (0 or 255) pushed outward is clamped and loses its update. The row gets the
    narrowest grid with an integer zero-point that holds all its updated values, and ``update`` is rewritten in
    the new code units (same weights, exactly); the stochastic rounding that follows is unbiased, so every entry
    of the row, edge codes included, moves by its update on average. Rows that fit are untouched.
    """
    lo, hi = update.amin(dim=1, keepdim=True), update.amax(dim=1, keepdim=True)
    rows = ((lo < 0) | (hi > _MAXQ)).view(-1).nonzero().view(-1)
    if not rows.numel():
        return
    scale, zero = weight.scale[r0 + rows], weight.zero_point[r0 + rows]
    below = zero - lo[rows].clamp(max=0)  # steps of the old grid needed below / above the zero-point
    above = hi[rows].clamp(min=_MAXQ) - zero
    split = below * _MAXQ / (below + above)
    best_scale, best_zero = torch.full_like(scale, float("inf")), zero.clone()
    for candidate in (split.floor(), split.ceil()):
        z = candidate.clamp(0, _MAXQ)
        need_lo = torch.where(z > 0, below / z.clamp(min=1), torch.where(below > 0, float("inf"), 0.0))
        need_hi = torch.where(z < _MAXQ, above / (_MAXQ - z).clamp(min=1), torch.where(above > 0, float("inf"), 0.0))
        s = scale * torch.maximum(need_lo, need_hi) * (1 + 1e-6)  # margin for float rounding at the ends
        better = s < best_scale
        best_scale, best_zero = torch.where(better, s, best_scale), torch.where(better, z, best_zero)
    update[rows] = (update[rows] - zero) * (scale / best_scale) + best_zero
    weight.scale[r0 + rows] = best_scale
    weight.zero_point[r0 + rows] = best_zero


@torch.no_grad()
def reselect_outliers_(weight) -> None:
    """Re-pick the float outliers among the largest entries without moving any weight off its grid.

    The per-channel grid stays fixed. An entry can leave the outlier set only if its value lies inside its row's
    grid, so rounding it onto the grid moves it by at most half a step; outliers outside their row's grid (the
    usual case right after quantization) stay outliers. The remaining slots go to the largest-magnitude entries;
    those that join are exact already. So the refresh moves no weight by more than half a step of its row's grid.
    """
    k = weight.num_outliers
    if not k:
        return
    w = weight.dequantize(torch.float32)
    codes = torch.round(w / weight.scale).add_(weight.zero_point)  # unclamped: outside [0, 255] means "does not fit"
    score = w.abs()
    score[(codes < 0) | (codes > _MAXQ)] = float("inf")  # must stay outliers (only outliers can be outside)
    idx = torch.topk(score.flatten(), k, sorted=False).indices.sort().values
    codes.clamp_(0, _MAXQ).view(-1)[idx] = weight.zero_point.expand_as(codes).reshape(-1)[idx]
    weight.outlier_val[:k].copy_(w.view(-1)[idx])
    weight.outlier_idx[:k].copy_(idx)
    weight.codes.copy_(codes)


__all__ = ["is_integer_weight", "lion_update_", "lion_update_rows_", "refit_overflowing_rows_", "reselect_outliers_"]
