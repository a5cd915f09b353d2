"""The autograd linear of QFT: ``x @ W^T`` from an integer ``QftWeight``, over row chunks of the weight."""

from __future__ import annotations

from typing import Optional

import torch

from ..chunks import row_chunks
from .hooks import sync_grad_chunk_
from .int8_grad import GradientRows
from .weight import QftWeight


class _QftLinearFn(torch.autograd.Function):
    """``x @ W^T`` where ``W`` is a ``QftWeight``, computed over row chunks of ``W`` (see ``CHUNK_ELEMENTS``).

    No weight-sized float tensor is ever materialized: the forward dequantizes one chunk of rows at a time into the
    activation dtype and writes that chunk's output columns; the backward dequantizes each chunk once, adds its
    share of ``grad_x`` and computes that chunk's weight-gradient rows, which are quantized to int8 right away
    (or written into the float gradient).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: QftWeight) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        x2 = x.reshape(-1, x.shape[-1])
        out = x2.new_empty(x2.shape[0], weight.shape[0])
        for r0, r1 in row_chunks(weight.shape[0], weight.shape[1]):
            torch.mm(x2, weight.dequantize_rows(r0, r1, x.dtype).t(), out=out[:, r0:r1])
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # Under autocast grad_out may be in a lower precision than the saved input: compute in grad_out's dtype.
        go = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1]).to(go.dtype)
        # grad_x sums one product per chunk: accumulate in float32 so low-precision runs round once, not per chunk.
        grad_x = torch.zeros(x2.shape, dtype=torch.float32, device=go.device) if need_x else None
        grad_w = GradientRows(weight.shape, weight.int8_grad, go.device, weight.dtype) if need_w else None
        for r0, r1 in row_chunks(weight.shape[0], weight.shape[1]):
            go_rows = go[:, r0:r1]
            if need_x and go.dtype == torch.float32:
                grad_x.addmm_(go_rows, weight.dequantize_rows(r0, r1, go.dtype))
            elif need_x:
                grad_x.add_(go_rows @ weight.dequantize_rows(r0, r1, go.dtype))
            if need_w:
                grad_w.put_(r0, r1, sync_grad_chunk_(go_rows.t() @ x2, weight))
        return (grad_x.to(x.dtype).view_as(x) if need_x else None), (grad_w.result() if need_w else None)


def qft_linear(x: torch.Tensor, weight: QftWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W^T + bias`` with gradients to ``x`` and to the integer weight (float or ``Int8Grad``)."""
    if not isinstance(weight, QftWeight):
        raise TypeError(f"qft_linear expects a QftWeight, got {type(weight).__name__}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features, the weight expects {weight.shape[1]}")
    out = _QftLinearFn.apply(x, weight)
    return out if bias is None else out + bias.to(out.dtype)


__all__ = ["qft_linear"]
