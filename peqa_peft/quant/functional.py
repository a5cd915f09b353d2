"""Fused ops on packed low-bit weights: dequantize-and-matmul with a scale-only backward.

``packed_linear(x, packed, scale, zero_point, ...)`` computes ``x @ W_hat^T`` with ``W_hat = s * (q - z)``
dequantized from the packed codes in the activation dtype. The dequantized weight is a temporary of the call:
it is neither kept between calls nor saved for backward (backward unpacks the codes again).

The backward never materializes a full-size weight gradient. With ``G = grad_out`` (``T x out``) and ``X``
(``T x in``), ``dL/dW = G^T X``; the scale gradient is its reduction over each group,
``dL/ds[i, g] = sum_{j in g} (G^T X)[i, j] * (q[i, j] - z[i, g])``, and ``dL/dz[i, g] = -s[i, g] sum_{j in g}
(G^T X)[i, j]``. Both are computed over blocks of output rows, so at most ``rows x in`` gradient entries exist
at a time (see ``_GRAD_CHUNK_ELEMENTS``).
"""

from __future__ import annotations

from typing import Optional

import torch

from .packing import unpack_bits
from .quantizer import num_groups

# Upper bound on the weight-gradient entries alive at once in the scale backward (16 MiB in fp32).
_GRAD_CHUNK_ELEMENTS = 1 << 22


def unpack_codes(packed: torch.Tensor, bits: int, out_features: int, in_features: int) -> torch.Tensor:
    """Unpacked ``uint8`` codes of shape ``(out_features, in_features)``."""
    return unpack_bits(packed, bits, out_features * in_features).view(out_features, in_features)


def dequantize_codes(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``s * (q - z)`` in ``dtype`` for codes ``(out, in)`` and per-group ``s``/``z`` of shape ``(out, n_groups)``."""
    out_features, in_features = codes.shape
    q = codes.view(out_features, scale.shape[1], -1).to(dtype)
    q.sub_(zero_point.to(dtype).unsqueeze(-1)).mul_(scale.to(dtype).unsqueeze(-1))
    return q.view(out_features, in_features)


def dequantize_packed(
    packed: torch.Tensor,
    bits: int,
    out_features: int,
    in_features: int,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The dense weight ``s * (q - z)`` from packed codes (used for forward, export and tests)."""
    return dequantize_codes(unpack_codes(packed, bits, out_features, in_features), scale, zero_point, dtype)


def _scale_zero_grads(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    want_scale: bool,
    want_zero: bool,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    out_features, in_features = codes.shape
    n_groups = scale.shape[1]
    g2 = grad_out.reshape(-1, out_features)
    x2 = x.reshape(-1, in_features)
    grad_scale = torch.empty(out_features, n_groups, dtype=torch.float32, device=x.device) if want_scale else None
    grad_zero = torch.empty(out_features, n_groups, dtype=torch.float32, device=x.device) if want_zero else None
    rows = max(1, min(out_features, _GRAD_CHUNK_ELEMENTS // in_features))
    for r0 in range(0, out_features, rows):
        r1 = min(out_features, r0 + rows)
        # Only this block of the weight gradient ever exists; it is reduced to the scale shape right away.
        dw = (g2[:, r0:r1].t() @ x2).float().view(r1 - r0, n_groups, -1)
        if want_scale:
            wbar = codes[r0:r1].view(r1 - r0, n_groups, -1).float() - zero_point[r0:r1].float().unsqueeze(-1)
            grad_scale[r0:r1] = (dw * wbar).sum(-1)
        if want_zero:
            grad_zero[r0:r1] = -dw.sum(-1) * scale[r0:r1].float()
    return grad_scale, grad_zero


class _PackedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, scale, zero_point, bits, out_features, in_features):
        weight = dequantize_packed(packed, bits, out_features, in_features, scale, zero_point, x.dtype)
        ctx.save_for_backward(x, packed, scale, zero_point)
        ctx.shape = (bits, out_features, in_features)
        return x @ weight.t()

    @staticmethod
    def backward(ctx, grad_out):
        x, packed, scale, zero_point = ctx.saved_tensors
        bits, out_features, in_features = ctx.shape
        need_x, _, need_s, need_z = ctx.needs_input_grad[:4]
        codes = unpack_codes(packed, bits, out_features, in_features)
        grad_x = grad_scale = grad_zero = None
        if need_x:
            grad_x = grad_out @ dequantize_codes(codes, scale, zero_point, grad_out.dtype)
        if need_s or need_z:
            grad_scale, grad_zero = _scale_zero_grads(grad_out, x, codes, scale, zero_point, need_s, need_z)
            grad_scale = grad_scale.to(scale.dtype) if grad_scale is not None else None
            grad_zero = grad_zero.to(zero_point.dtype) if grad_zero is not None else None
        return grad_x, None, grad_scale, grad_zero, None, None, None


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
    """
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {in_features}")
    if scale.shape != zero_point.shape or scale.shape[0] != out_features or in_features % scale.shape[1]:
        raise ValueError(f"scale/zero_point shapes {tuple(scale.shape)}/{tuple(zero_point.shape)} do not fit layer")
    out = _PackedLinearFn.apply(x, packed, scale, zero_point, bits, out_features, in_features)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out


__all__ = ["dequantize_codes", "dequantize_packed", "num_groups", "packed_linear", "unpack_codes"]
