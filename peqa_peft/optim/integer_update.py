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
every parameter for which :func:`is_integer_weight` holds with :func:`lion_momentum_update_` (one fused function per
row chunk: direction, momentum and code update; compiled or eager, bit-identical) and calls
:func:`reselect_outliers_` every ``refresh_every`` steps. :func:`lion_update_rows_` is the same code update for a
given direction.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Optional

import torch

from ..core import kernels
from ..core.chunks import row_chunks
from ..core.stochastic import counter_uniform, key_tensor, stochastic_round
from .blockwise import compand

_MAXQ = 255  # the largest 8-bit code
_MAXC = 127  # the largest int8 momentum code (peqa_peft.optim.blockwise's companded grid)
_TINY = torch.finfo(torch.float32).tiny  # absmax of an all-zero momentum block
PROTOCOL = ("codes", "scale", "zero_point", "outlier_idx", "outlier_val", "outlier_range")


def is_integer_weight(p: torch.Tensor) -> bool:
    """Whether ``p`` is an integer row weight (see the module docstring) that IntLion updates in its codes."""
    return all(hasattr(p, name) for name in PROTOCOL)


@torch.no_grad()
def lion_update_(weight, direction: torch.Tensor, lr: float, weight_decay: float, key: tuple[int, int]) -> None:
    """``W <- W - lr * (direction + weight_decay * W)`` on the whole weight (see :func:`lion_update_rows_`)."""
    for r0, r1 in row_chunks(weight.shape[0], weight.shape[1]):
        lion_update_rows_(weight, r0, r1, direction[r0:r1], lr, weight_decay, key)


@torch.no_grad()
def lion_update_rows_(
    weight, r0: int, r1: int, direction: torch.Tensor, lr: float, weight_decay: float, key: tuple[int, int]
) -> None:
    """Apply ``W <- W - lr * (direction + weight_decay * W)`` to rows ``r0:r1`` (``direction``: those rows).

    In code units the dense update is ``-(lr / s) * direction - lr * weight_decay * (q - z)`` per entry; it is
    stochastically rounded to whole steps (unbiased, so sub-step learning rates still move weights on average) with
    the counter-based noise named by ``key`` (:func:`~peqa_peft.core.stochastic.counter_key`), so consecutive row
    ranges get the same noise as one call on the whole weight. A row whose updated codes would leave ``[0, 255]``
    first gets a wider grid (:func:`refit_overflowing_rows_`), so no update is lost to clamping at the edges.
    Outliers take the same update exactly, in float. This is the building block with a given direction; IntLion's
    own update (:func:`lion_momentum_update_`) computes the direction and momentum in the same pass.
    """
    device = weight.codes.device
    direction = direction.float()
    codes = weight.codes[r0:r1].float()
    lo, hi = weight.outlier_range(r0, r1)
    local = weight.outlier_idx[lo:hi].long() - r0 * weight.shape[1]
    mask = _outlier_mask(local, r1 - r0, weight.shape[1], device)
    hp = _hparams(lr, weight_decay, 0.0, 0.0, device)
    update = _code_update(codes, weight.scale[r0:r1], weight.zero_point[r0:r1], direction, mask, hp)
    scale, zero, update = _refit(update, weight.scale[r0:r1], weight.zero_point[r0:r1])
    new = stochastic_round(update, key_tensor(key, device), torch.tensor(r0, dtype=torch.int32, device=device))
    weight.scale[r0:r1], weight.zero_point[r0:r1] = scale, zero
    weight.codes[r0:r1].copy_(new.clamp_(0, _MAXQ))
    if hi > lo:
        outliers = weight.outlier_val[lo:hi]
        outliers.mul_(1.0 - lr * weight_decay).sub_(direction.reshape(-1)[local], alpha=lr)


# ---------------------------------------------------------------- IntLion's fused update of one row chunk
#
# One function, `_lion_rows`, holds the whole update of a row chunk: dequantize the gradient and the int8 momentum,
# Lion's direction and momentum, the weight update in code units, the grid re-fit of overflowing rows, stochastic
# rounding with counter-based noise, requantization of the codes and of the momentum blocks. It is written without
# in-place ops and without data-dependent shapes, so torch.compile (Inductor) turns it into a few loops over the
# chunk that recompute their inputs in registers instead of storing per-op temporaries; run uncompiled, the very
# same ops are the eager reference. Every float op is a single correctly rounded IEEE operation (no `add(...,
# alpha=)`, which ATen computes with a fused multiply-add; Inductor's C++ is compiled with -ffp-contract=off), and
# the reductions are min/max (exact in any order), so the compiled and eager paths give bit-identical results.


def _hparams(lr: float, weight_decay: float, beta1: float, beta2: float, device: torch.device) -> torch.Tensor:
    """The float32 constants of the update, as a tensor (a compiled kernel then does not recompile when lr changes)."""
    values = [beta1, 1.0 - beta1, beta2, 1.0 - beta2, -lr, -lr * weight_decay]
    return torch.tensor(values, dtype=torch.float32, device=device)


def _outlier_mask(local: torch.Tensor, rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """A bool ``(rows, cols)`` mask of a chunk's outlier entries (``local``: their flat indices in the chunk)."""
    mask = torch.zeros(rows * cols, dtype=torch.bool, device=device)
    mask[local] = True
    return mask.view(rows, cols)


def _code_update(codes, scale, zero, direction, outliers, hp) -> torch.Tensor:
    """The updated weight in fractional code units: ``q - (lr / s) * d - lr * wd * (q - z)`` (outliers: ``z``)."""
    update = (direction * (hp[4] / scale) + (codes - zero) * hp[5]) + codes
    return torch.where(outliers, zero, update)  # outlier slots hold the zero point; their value lives in float


def _refit(update: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dims: tuple[int, ...] = (1,)):
    """``(scale, zero, update)`` with the narrowest integer-zero grid for rows of ``update`` outside ``[0, 255]``.

    Rows that fit keep their grid and values. Written for all rows at once with ``where`` (no data-dependent
    shapes), so it compiles into the kernel; :func:`refit_overflowing_rows_` documents the rule. ``dims``: the
    dimensions of ``update`` that make up a row.
    """
    lo, hi = update.amin(dim=dims, keepdim=True), update.amax(dim=dims, keepdim=True)
    fits = (lo >= 0) & (hi <= _MAXQ)
    below = zero - lo.clamp(max=0)  # steps of the old grid needed below / above the zero-point
    above = hi.clamp(min=_MAXQ) - zero
    split = below * _MAXQ / (below + above)
    best_scale, best_zero = torch.full_like(scale, float("inf")), zero
    for candidate in (split.floor(), split.ceil()):
        z = candidate.clamp(0, _MAXQ)
        need_lo = torch.where(z > 0, below / z.clamp(min=1), torch.where(below > 0, float("inf"), 0.0))
        need_hi = torch.where(z < _MAXQ, above / (_MAXQ - z).clamp(min=1), torch.where(above > 0, float("inf"), 0.0))
        s = scale * torch.maximum(need_lo, need_hi) * (1 + 1e-6)  # margin for float rounding at the ends
        better = s < best_scale
        best_scale, best_zero = torch.where(better, s, best_scale), torch.where(better, z, best_zero)
    new_scale, new_zero = torch.where(fits, scale, best_scale), torch.where(fits, zero, best_zero)
    refitted = (update - zero) * (scale / new_scale) + new_zero
    return new_scale, new_zero, torch.where(fits, update, refitted)


def _lion_rows(codes, scale, zero, grad, grad_scale, m_codes, m_absmax, outliers, hp, key, row0):
    """IntLion's update of one row chunk, as a pure function (see the comment above). Returns new tensors:

    ``(codes, scale, zero_point, momentum, momentum_absmax)``. ``grad``: float rows, or int8 codes with row scales
    ``grad_scale``; ``m_codes``: the chunk's int8 momentum blocks ``(n_blocks, block)`` with ``m_absmax``, or its
    float32 momentum ``(rows, cols)`` when ``m_absmax`` is None.

    ``codes`` and ``momentum`` come back contiguous but possibly in the ``(rows, blocks per row, block)`` view the
    kernel computed them in: the caller reshapes them (free in eager). Reshaping them here would make Inductor,
    which cannot prove the 3-D -> 2-D view contiguous for dynamic shapes, copy them in a scalar loop with an integer
    modulo per entry -- measured 6.2 -> 3.5 ns per entry for the whole kernel without it.
    """
    rows, cols = codes.shape
    noise = counter_uniform(key, row0, rows, cols)
    g = grad.float() if grad_scale is None else grad.float() * grad_scale
    if m_absmax is not None and cols % m_codes.shape[1] == 0:
        # Momentum blocks tile the rows: compute in (rows, blocks per row, block) views of everything, so that a
        # compiled kernel indexes all tensors affinely (a flat <-> 2-D reshape of the momentum would cost an integer
        # division per entry in a kernel compiled for dynamic shapes).
        per_row = (rows, cols // m_codes.shape[1], m_codes.shape[1])
        codes, g, noise, outliers = (t.reshape(per_row) for t in (codes, g, noise, outliers))
        scale, zero = scale.unsqueeze(2), zero.unsqueeze(2)
        m_codes, m_absmax = m_codes.view(per_row), m_absmax.view(rows, per_row[1], 1)
        y = m_codes.float() / _MAXC
        m = y.abs() * y * m_absmax
        m, direction = m * hp[2] + g * hp[3], torch.sign(m * hp[0] + g * hp[1])
        m_absmax = m.abs().amax(dim=2, keepdim=True).clamp_min(_TINY)
        m = compand(m / m_absmax)
        m_absmax = m_absmax.view(-1)
        reduce_dims = (1, 2)
    else:  # blocks straddle rows (or float momentum): the general form, through a flat view with zero padding
        if m_absmax is None:
            m = m_codes
        else:
            y = m_codes.float() / _MAXC
            m = (y.abs() * y * m_absmax.unsqueeze(1)).view(-1)[: rows * cols].view(rows, cols)
        m, direction = m * hp[2] + g * hp[3], torch.sign(m * hp[0] + g * hp[1])
        if m_absmax is not None:
            blocks = torch.nn.functional.pad(m.view(-1), (0, m_codes.numel() - rows * cols)).view(m_codes.shape)
            m_absmax = blocks.abs().amax(dim=1).clamp_min(_TINY)
            m = compand(blocks / m_absmax.unsqueeze(1))
        reduce_dims = (1,)
    codes = codes.float()
    update = _code_update(codes, scale, zero, direction, outliers, hp)
    scale, zero, update = _refit(update, scale, zero, reduce_dims)
    new_codes = torch.floor(update + noise).clamp(0, _MAXQ).to(torch.uint8)
    return new_codes, scale.view(rows, 1), zero.view(rows, 1), m, m_absmax


_compiled_rows: list = []  # the torch.compile'd `_lion_rows`, made on first use


def _compiled() -> Callable:
    if not _compiled_rows:
        # dynamic=True: one compiled kernel serves every chunk shape (a Llama has ~6); grad dtypes and momentum formats
        # add a few more (Dynamo's recompile limit, 8, is raised as peqa_peft's other kernels do).
        _compiled_rows.append(torch.compile(_lion_rows, dynamic=True, fullgraph=True))
    return _compiled_rows[0]


def _recompile_scope(path: str):
    """Dynamo's per-function recompile limit (8) raised to 64 around one compiled update call only (grad dtypes and
    momentum formats add graphs), never for the whole process: a user's own ``torch.compile`` keeps its setting."""
    if path != "compiled":
        return contextlib.nullcontext()
    config = torch._dynamo.config
    return config.patch(recompile_limit=max(config.recompile_limit, 64))


def update_kernel(kernel: str, numel: int) -> str:
    """``"compiled"`` or ``"eager"``: the path IntLion's ``kernel`` option picks for a weight of ``numel`` entries.

    ``"auto"`` compiles where peqa_peft's kernels do (kernel mode ``"compiled"``, the default, and a weight of at
    least ``COMPILE_MIN_WEIGHTS`` entries: below that, compiling costs more than it saves).
    """
    if kernel != "auto":
        return kernel
    return "compiled" if kernels.compiles(numel) else "eager"


@torch.no_grad()
def lion_momentum_update_(
    weight,
    grad: torch.Tensor,
    momentum: torch.Tensor,
    momentum_absmax: Optional[torch.Tensor],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    key: tuple[int, int],
    kernel: str = "auto",
) -> None:
    """IntLion's whole update of an integer weight from its gradient, row chunk by row chunk, in place.

    ``c = beta1 * m + (1 - beta1) * g``, ``d = sign(c)``, ``m <- beta2 * m + (1 - beta2) * g``, then
    ``W <- W - lr * (d + weight_decay * W)`` as :func:`lion_update_rows_` defines it. ``momentum``: int8 blocks
    ``(n_blocks, block)`` with float32 ``momentum_absmax`` (``peqa_peft.optim.blockwise``), or float32 of the
    weight's shape (``momentum_absmax`` None); updated in place. ``grad``: float, or int8 with ``codes`` / ``scale``
    rows (QFT's ``Int8Grad``). ``kernel``: ``"compiled"`` (one torch.compile'd pass per row chunk), ``"eager"``
    (the same function uncompiled: bit-identical results) or ``"auto"`` (:func:`update_kernel`).
    """
    rows, cols = weight.shape
    device = weight.codes.device
    path = update_kernel(kernel, rows * cols)
    run = _compiled() if path == "compiled" else _lion_rows
    hp = _hparams(lr, weight_decay, betas[0], betas[1], device)
    key_t = key_tensor(key, device)
    int8_grad = hasattr(grad, "dequantize_rows") and hasattr(grad, "codes") and hasattr(grad, "scale")
    block = momentum.shape[1] if momentum_absmax is not None else 1
    for r0, r1 in row_chunks(rows, cols, block):
        a, b = r0 * cols, r1 * cols
        g, g_scale = (grad.codes[r0:r1], grad.scale[r0:r1]) if int8_grad else (grad[r0:r1], None)
        if momentum_absmax is None:
            m, m_absmax = momentum.view(rows, cols)[r0:r1], None
        else:
            b0, b1 = a // block, -(-b // block)
            m, m_absmax = momentum[b0:b1], momentum_absmax[b0:b1]
        lo, hi = weight.outlier_range(r0, r1)
        local = weight.outlier_idx[lo:hi].long() - a
        if hi > lo:  # the outliers' direction, from their own momentum and gradient entries (before the update)
            d_out = _outlier_direction(local, g, g_scale, m, m_absmax, cols, hp)
        mask = _outlier_mask(local, r1 - r0, cols, device)
        row0 = torch.tensor(r0, dtype=torch.int32, device=device)
        args = (weight.codes[r0:r1], weight.scale[r0:r1], weight.zero_point[r0:r1], g, g_scale, m, m_absmax, mask,
                hp, key_t, row0)  # fmt: skip
        try:
            with _recompile_scope(path):
                out = run(*args)
        except Exception as exc:  # compiling failed (no C++ compiler, unsupported device): same math, uncompiled
            if run is _lion_rows or kernel == "compiled":  # asked for explicitly: no silent fallback
                raise
            warnings.warn(
                f"peqa_peft: torch.compile of IntLion's update failed ({type(exc).__name__}: {str(exc)[:200]}); "
                "using the eager update (same results) and uncompiled kernels from now on.",
                RuntimeWarning,
                stacklevel=3,
            )
            kernels.set_kernel_mode("eager")  # as peqa_peft's other kernels do ("auto" follows the kernel mode)
            run = _lion_rows
            out = run(*args)  # the kernel is a pure function: nothing was written yet
        weight.codes[r0:r1] = out[0].view(r1 - r0, cols)
        weight.scale[r0:r1], weight.zero_point[r0:r1] = out[1], out[2]
        m.copy_(out[3].view_as(m))
        if m_absmax is not None:
            m_absmax.copy_(out[4])
        if hi > lo:
            weight.outlier_val[lo:hi].mul_(1.0 - lr * weight_decay).sub_(d_out, alpha=lr)


def _outlier_direction(local, g, g_scale, m, m_absmax, cols: int, hp: torch.Tensor) -> torch.Tensor:
    """Lion's direction at a chunk's outlier entries (flat indices ``local``), by the kernel's formula."""
    g = g.reshape(-1)[local].float()
    if g_scale is not None:
        g = g * g_scale.view(-1)[local // cols]
    if m_absmax is None:
        m = m.reshape(-1)[local]
    else:
        y = m.view(-1)[local].float() / _MAXC
        m = y.abs() * y * m_absmax[local // m.shape[1]]
    return torch.sign(m * hp[0] + g * hp[1])


@torch.no_grad()
def refit_overflowing_rows_(weight, r0: int, update: torch.Tensor) -> None:
    """Widen the grid of every row whose updated codes ``update`` (rows ``r0:``) leave ``[0, 255]``.

    Without this an edge code (0 or 255) pushed outward is clamped and loses its update. The row gets the
    narrowest grid with an integer zero-point that holds all its updated values, and ``update`` is rewritten in
    the new code units (same weights, exactly); the stochastic rounding that follows is unbiased, so every entry
    of the row, edge codes included, moves by its update on average. Rows that fit are untouched.
    """
    r1 = r0 + update.shape[0]
    weight.scale[r0:r1], weight.zero_point[r0:r1], new = _refit(update, weight.scale[r0:r1], weight.zero_point[r0:r1])
    update.copy_(new)


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


__all__ = [
    "is_integer_weight",
    "lion_momentum_update_",
    "lion_update_",
    "lion_update_rows_",
    "refit_overflowing_rows_",
    "reselect_outliers_",
    "update_kernel",
]
