"""Token-embedding lookups from an integer ``QftWeight``, with the weight gradient built row chunk by row chunk.

An embedding is a ``(num_embeddings, embedding_dim)`` weight whose forward only *reads* rows: so the forward
dequantizes just the distinct rows the batch looks up, never the whole ``vocab x hidden`` float matrix, and the
backward sums the output gradient into the rows the batch touched and quantizes just those (``Int8Grad``'s scales
are per row); every other row's gradient is zero. Under DDP gradient sync it goes one chunk of
vocabulary rows at a time instead, so that every rank joins every chunk's all-reduce.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..chunks import row_chunks
from .hooks import sync_grad_chunk_
from .int8_grad import GradientRows
from .weight import QftWeight, dequantize_codes


def dequantize_row_index(weight: QftWeight, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``rows`` (sorted, distinct, 1-D) of ``weight.dequantize()``, outliers included, as a new tensor."""
    out = dequantize_codes(weight.codes[rows], weight.zero_point[rows], weight.scale[rows], dtype)
    if weight.outlier_idx.numel():
        # Each looked-up row's outliers are one slice of the sorted flat index: find the slices' bounds (two binary
        # searches per row) instead of scanning every outlier of the vocabulary (1% of it) at each lookup.
        cols = weight.shape[1]
        idx = weight.outlier_idx
        starts = rows.to(idx.dtype) * cols
        lo, hi = torch.searchsorted(idx, torch.stack([starts, starts + cols]))
        counts = hi - lo
        total = int(counts.sum())
        if total:
            row_of = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), counts)
            first = torch.repeat_interleave(lo - (counts.cumsum(0) - counts), counts)
            slots = torch.arange(total, device=rows.device) + first  # positions in outlier_idx / outlier_val
            out[row_of, idx[slots].long() % cols] = weight.outlier_val[slots].to(dtype)
    return out


def _weight_grad(
    ids: torch.Tensor, grad_out: torch.Tensor, weight: QftWeight, padding_idx: Optional[int]
) -> torch.Tensor:
    """The embedding's weight gradient (``Int8Grad`` or float): the rows a batch touches, every other row zero."""
    ids = ids.reshape(-1)
    go = grad_out.reshape(-1, grad_out.shape[-1]).float()
    if padding_idx is not None:  # nn.Embedding: the padding row gets no gradient
        keep = ids != padding_idx
        ids, go = ids[keep], go[keep]
    if getattr(weight, "sync_grads", False):
        return _synced_weight_grad(ids, go, weight)
    rows, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    touched = torch.zeros(rows.numel(), weight.shape[1], dtype=torch.float32, device=go.device)
    touched.index_add_(0, inverse, go)
    grad = GradientRows(weight.shape, weight.int8_grad, go.device, weight.dtype, zero=True)
    grad.put_index_(rows, touched)  # the gradient is quantized per row: only the touched rows need it
    return grad.result()


def _synced_weight_grad(ids: torch.Tensor, go: torch.Tensor, weight: QftWeight) -> torch.Tensor:
    """The weight gradient averaged over DDP ranks, one row chunk at a time: every rank takes part in every chunk's
    all-reduce whichever rows its own batch touched (ranks touch different rows)."""
    ids, order = torch.sort(ids)
    go = go[order]
    rows, cols = weight.shape
    grad = GradientRows(weight.shape, weight.int8_grad, go.device, weight.dtype)
    for r0, r1 in row_chunks(rows, cols):
        bounds = torch.tensor([r0, r1], device=ids.device)
        lo, hi = torch.searchsorted(ids, bounds).tolist()
        chunk = torch.zeros(r1 - r0, cols, dtype=torch.float32, device=go.device)
        chunk.index_add_(0, ids[lo:hi] - r0, go[lo:hi])
        grad.put_(r0, r1, sync_grad_chunk_(chunk, weight))
    return grad.result()


class _QftEmbeddingFn(torch.autograd.Function):
    """``weight[ids]`` for a ``QftWeight``: dequantizes only the looked-up rows; int8 weight gradient by chunks."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: QftWeight, padding_idx: Optional[int]) -> torch.Tensor:
        ctx.save_for_backward(ids, weight)
        ctx.padding_idx = padding_idx
        rows, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        return dequantize_row_index(weight, rows, weight.dtype)[inverse]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        ids, weight = ctx.saved_tensors
        grad_w = _weight_grad(ids, grad_out, weight, ctx.padding_idx) if ctx.needs_input_grad[1] else None
        return None, grad_w, None


def qft_embedding(ids: torch.Tensor, weight: QftWeight, padding_idx: Optional[int] = None) -> torch.Tensor:
    """``F.embedding(ids, W, padding_idx)`` for an integer ``W`` (gradient to ``W`` as ``Int8Grad`` or float)."""
    if not isinstance(weight, QftWeight):
        raise TypeError(f"qft_embedding expects a QftWeight, got {type(weight).__name__}")
    if ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"embedding indices must be integers, got {ids.dtype}")
    if ids.numel() and (ids.min() < 0 or ids.max() >= weight.shape[0]):
        raise IndexError(f"token id out of range [0, {weight.shape[0]}): min {ids.min()}, max {ids.max()}")
    return _QftEmbeddingFn.apply(ids, weight, padding_idx)


__all__ = ["dequantize_row_index", "qft_embedding"]
