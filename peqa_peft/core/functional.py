"""Fused ops on packed low-bit weights: ``x @ (s * (q - z))^T`` with a scale-only backward.

``packed_linear(x, packed, scale, zero_point, ...)`` computes the product in the activation dtype from the packed
codes; the dequantized weight is a temporary of the call, never kept between calls nor saved for backward. With
``G = grad_out`` (``T x out``), ``X`` (``T x in``) and ``W0 = q - z``:

- **Per-channel scales** (one per output row): ``y = s * y0`` with ``y0 = X @ W0^T``, so
  ``dL/ds[o] = sum_t G[t, o] * y0[t, o]`` and ``dL/dX = (G * s) @ W0``. The forward keeps ``y0`` (activation-sized,
  ``T x out``) for the backward, which therefore costs one matmul, like the backward of a frozen linear layer, and
  never forms a weight-shaped gradient.
- **Grouped scales**: ``dL/ds[o, g] = sum_{j in g} (G^T X)[o, j] * W0[o, j]`` needs the product ``G^T X``; it is
  formed one block of output rows at a time (at most ``_GRAD_CHUNK_ELEMENTS`` entries alive) and reduced against the
  codes right away by one fused kernel. (A batched matmul over groups, ``X_g @ W0_g^T`` for every group ``g``, costs
  the same multiply-adds but makes ``n_groups`` activation-sized products; 2.7x slower at 5632 x 2048,
  benchmarks/peqa_kernels_micro.py.)
- **Zero-points**: ``dL/dz[o, g] = -s[o, g] * sum_t G[t, o] * sum_{j in g} X[t, j]``: a ``T x out`` by ``T x n_groups``
  product, cheap for any grouping.

The unpack-and-dequantize and the batch-1 decode product are the one-pass kernels of :mod:`.kernels` (compiled by
``torch.compile`` by default); ``PEQA_KERNELS=reference`` replaces all of this by plain autograd through a dense
dequantized weight, the reference the tests compare against.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import kernels
from .packing import unpack_bits
from .quantizer import dequantize, num_groups

# Rows of the weight are dequantized and multiplied one block at a time: a block of this many entries (4 MiB in
# fp32) stays in cache between the kernel that writes it and the matmul that reads it, and reusing small blocks
# avoids the page faults of allocating a fresh weight-sized buffer at every call (they cost as much as the
# dequantization itself). It also bounds the weight-gradient block of the grouped scale backward.
_BLOCK_ELEMENTS = 1 << 20


def unpack_codes(packed: torch.Tensor, bits: int, out_features: int, in_features: int) -> torch.Tensor:
    """Unpacked ``uint8`` codes of shape ``(out_features, in_features)``."""
    return unpack_bits(packed, bits, out_features * in_features).view(out_features, in_features)


def dequantize_codes(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``s * (q - z)`` in ``dtype`` for codes ``(out, in)`` and per-group ``s``/``z`` of shape ``(out, n_groups)``.

    Plain PyTorch and differentiable in ``scale`` and ``zero_point``: the reference of the fused kernels.
    """
    groups = scale.shape[1]
    return dequantize(codes, scale, zero_point, None if groups == 1 else codes.shape[1] // groups, dtype)


def dequantize_packed(
    packed: torch.Tensor,
    bits: int,
    out_features: int,
    in_features: int,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The dense weight ``s * (q - z)`` from packed codes (used for export, the reference path and tests)."""
    return dequantize_codes(unpack_codes(packed, bits, out_features, in_features), scale, zero_point, dtype)


def _row_blocks(out_features: int, in_features: int, row_bytes: Optional[int]) -> list[tuple[int, int]]:
    """Row ranges ``[r0, r1)`` of at most ``_BLOCK_ELEMENTS`` weights, equal-sized where a divisor allows.

    Equal blocks keep each compiled kernel at one shape per layer. Rows that are not whole packing units
    (``row_bytes`` None: odd shapes in natural order) are processed as one block.
    """
    budget = max(1, min(out_features, _BLOCK_ELEMENTS // in_features))
    if row_bytes is None:
        budget = out_features
    rows = next((r for r in range(budget, max(1, budget // 2) - 1, -1) if out_features % r == 0), budget)
    return [(r0, min(out_features, r0 + rows)) for r0 in range(0, out_features, rows)]


class _Layer:
    """Shape facts of one packed layer, shared by forward and backward."""

    def __init__(self, bits, out_features, in_features, k):
        self.bits, self.out_features, self.in_features, self.k = bits, out_features, in_features, k
        # Blocks of rows slice the packed stream: only possible where every row is whole packing units.
        aligned = k == kernels.plane_unit(bits)[0]
        self.row_bytes = in_features * bits // 8 if aligned else None
        self.blocks = _row_blocks(out_features, in_features, self.row_bytes)

    def codes(self, packed, r0, r1):
        return packed if self.row_bytes is None else packed[r0 * self.row_bytes : r1 * self.row_bytes]

    def dequant(self, packed, scale, zero_point, r0, r1, dtype):
        """Rows ``r0:r1`` of ``q - z`` (``scale`` None) or ``s * (q - z)``, plane order, in ``dtype``."""
        s = None if scale is None else scale[r0:r1]
        codes = self.codes(packed, r0, r1)
        return kernels.dequant_planes(codes, s, zero_point[r0:r1], self.bits, r1 - r0, self.in_features, self.k, dtype)


class _PackedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, scale, zero_point, layer):
        ctx.layer = layer
        x2 = x.reshape(-1, layer.in_features)
        xp = kernels.to_planes(x2, layer.k)
        need_s, need_z = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        per_channel = scale.shape[1] == 1
        out = torch.empty(x2.shape[0], layer.out_features, dtype=x.dtype, device=x.device)
        for r0, r1 in layer.blocks:
            w = layer.dequant(packed, None if per_channel else scale, zero_point, r0, r1, x.dtype)
            torch.mm(xp, w.t(), out=out[:, r0:r1])
        y0 = None
        if per_channel:
            y0, out = out, out * scale.view(1, -1).to(x.dtype)
        # Only what the requested gradients need is kept: y0 (per channel) or the permuted x (grouped) for the
        # scales, the per-group sums of x for the zero-points.
        keep_y0 = y0 if need_s and per_channel else None
        keep_x = xp if need_s and not per_channel else None
        xsum = x2.float().view(x2.shape[0], scale.shape[1], -1).sum(-1) if need_z else None
        ctx.save_for_backward(packed, scale, zero_point, keep_y0, keep_x, xsum)
        return out.view(*x.shape[:-1], layer.out_features)

    @staticmethod
    def backward(ctx, grad_out):
        packed, scale, zero_point, y0, xp, xsum = ctx.saved_tensors
        layer = ctx.layer
        need_x, _, need_s, need_z = ctx.needs_input_grad[:4]
        g2 = grad_out.reshape(-1, layer.out_features)
        per_channel = scale.shape[1] == 1
        grad_x = grad_scale = grad_zero = None
        if need_s and per_channel:
            grad_scale = (g2.float() * y0.float()).sum(0).view_as(scale)
        elif need_s:
            grad_scale = torch.empty(scale.shape, dtype=torch.float32, device=g2.device)
        if need_x or (need_s and not per_channel):
            grad_x = _blockwise_backward(g2, xp, packed, scale, zero_point, layer, need_x, grad_scale)
        if grad_x is not None:
            grad_x = grad_x.view(*grad_out.shape[:-1], layer.in_features)
        if need_z:
            grad_zero = -(g2.float().t() @ xsum) * scale.float()
        grad_scale = None if grad_scale is None else grad_scale.to(scale.dtype)
        grad_zero = None if grad_zero is None else grad_zero.to(zero_point.dtype)
        return grad_x, None, grad_scale, grad_zero, None


def _blockwise_backward(g2, xp, packed, scale, zero_point, layer, need_x, grad_scale) -> Optional[torch.Tensor]:
    """One pass over row blocks: ``dL/dX = G @ W_hat`` and, for grouped scales, ``dL/ds`` into ``grad_scale``.

    Per channel, ``G @ W_hat = (G * s) @ (q - z)``. Grouped, ``dL/ds`` is ``G^T X`` for the block's rows (the only
    part of the weight gradient that ever exists) reduced per group against ``q - z`` by one fused kernel.
    """
    per_channel = scale.shape[1] == 1
    grouped_scale = grad_scale is not None and not per_channel
    gxp = torch.zeros(g2.shape[0], layer.in_features, dtype=g2.dtype, device=g2.device) if need_x else None
    g_in = g2 * scale.view(1, -1).to(g2.dtype) if per_channel and need_x else g2
    for r0, r1 in layer.blocks:
        if need_x:
            w = layer.dequant(packed, None if per_channel else scale, zero_point, r0, r1, g2.dtype)
            gxp.addmm_(g_in[:, r0:r1], w)
        if grouped_scale:
            dw = g2[:, r0:r1].t() @ xp  # (rows, in), plane order
            codes = layer.codes(packed, r0, r1)
            grad_scale[r0:r1] = kernels.group_dot(
                dw, codes, zero_point[r0:r1], layer.bits, r1 - r0, layer.in_features, layer.k
            )
    return None if gxp is None else kernels.from_planes(gxp, layer.k)


def _reference_linear(x, packed, scale, zero_point, bits, out_features, in_features) -> torch.Tensor:
    """Plain autograd through a dense dequantized weight (``PEQA_KERNELS=reference``)."""
    weight = dequantize_packed(packed, bits, out_features, in_features, scale, zero_point, x.dtype)
    return F.linear(x, weight)


def _decode(x, packed, scale, zero_point, bits, out_features, in_features, k) -> torch.Tensor:
    """One token without autograd: the fused product straight from the codes (no dequantized weight)."""
    y = kernels.decode_product(x.reshape(in_features), packed, scale, zero_point, bits, out_features, in_features, k)
    return y.to(x.dtype).view(*x.shape[:-1], out_features)


def packed_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    out_features: int,
    in_features: int,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``x @ (s * (q - z))^T + bias`` computed in ``x.dtype`` from packed codes.

    Gradients flow to ``x``, ``scale`` and ``zero_point`` (whichever require grad); the codes are constants.
    ``scale``/``zero_point`` have shape ``(out_features, n_groups)`` with ``n_groups`` dividing ``in_features``.
    Without autograd, a single input row (batch-1 decoding) takes the fused decode kernel.
    """
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {in_features}")
    if scale.shape != zero_point.shape or scale.shape[0] != out_features or in_features % scale.shape[1]:
        raise ValueError(f"scale/zero_point shapes {tuple(scale.shape)}/{tuple(zero_point.shape)} do not fit layer")
    mode = kernels.kernel_mode()
    if mode == "reference":
        out = _reference_linear(x, packed, scale, zero_point, bits, out_features, in_features)
    else:
        group_size = None if scale.shape[1] == 1 else in_features // scale.shape[1]
        k = kernels.plane_width(bits, in_features, group_size)
        grad = torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or zero_point.requires_grad)
        if not grad and x.numel() == in_features:
            out = _decode(x, packed, scale, zero_point, bits, out_features, in_features, k)
        else:
            layer = _Layer(bits, out_features, in_features, k)
            out = _PackedLinearFn.apply(x, packed, scale, zero_point, layer)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out


__all__ = ["dequantize_codes", "dequantize_packed", "num_groups", "packed_linear", "unpack_codes"]
