"""``Int8Grad``: a weight gradient held as ``int8`` codes with one float32 scale per output row.

A wrapper tensor subclass (see :mod:`peqa_peft.core.qft.dispatch`) that looks like a float gradient to PyTorch. It
implements the few ops PyTorch applies to gradients: accumulation (``add_``, gradient accumulation), norms and
in-place scaling (``clip_grad_norm_``, where scaling only multiplies the row scales, so clipping is exact).
:class:`GradientRows` builds one row chunk at a time, as backward passes compute it.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..chunks import row_chunks
from ..memory import tensor_bytes
from .dispatch import NOT_HANDLED, IntegerTensor
from .grad import ZERO_ROW_SCALE, quantize_grad_rows

aten = torch.ops.aten


class Int8Grad(IntegerTensor):
    """A gradient stored as ``int8`` codes in ``[-127, 127]`` with a float32 scale per leading-dim row."""

    codes: torch.Tensor
    scale: torch.Tensor

    @staticmethod
    def __new__(cls, codes, scale, dtype):
        return torch.Tensor._make_wrapper_subclass(cls, codes.shape, dtype=dtype, device=codes.device)

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
        self.codes, self.scale = codes, scale

    def __tensor_flatten__(self) -> tuple[list[str], dict[str, Any]]:
        return ["codes", "scale"], {"dtype": self.dtype}

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, torch.Tensor], meta: dict[str, Any], outer_size, outer_stride):
        return Int8Grad(inner["codes"], inner["scale"], meta["dtype"])

    @classmethod
    @torch.no_grad()
    def from_float(cls, grad: torch.Tensor, dtype: Optional[torch.dtype] = None) -> Int8Grad:
        """Round ``grad`` (2-D) to the nearest int8 code with per-row absmax scales."""
        codes, scale = quantize_grad_rows(grad.detach())
        return cls(codes, scale, dtype or grad.dtype)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The float gradient ``codes * scale``."""
        return self.dequantize_rows(0, self.shape[0], dtype)

    def dequantize_rows(self, r0: int, r1: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Rows ``r0:r1`` of :meth:`dequantize` (a new tensor)."""
        dtype = dtype or self.dtype
        return self.codes[r0:r1].to(dtype).mul_(self.scale[r0:r1].to(dtype))

    def is_finite(self) -> bool:
        """Whether every entry is finite: the codes always are, so this checks the row scales."""
        return bool(torch.isfinite(self.scale).all())

    def storage_bytes(self) -> int:
        """Bytes of the codes and row scales."""
        return tensor_bytes(self.codes) + tensor_bytes(self.scale)

    def _requantize_(self, value: torch.Tensor) -> Int8Grad:
        fresh = Int8Grad.from_float(value, self.dtype)
        self.codes.copy_(fresh.codes)
        self.scale.copy_(fresh.scale)
        return self

    @staticmethod
    def _sum(a: torch.Tensor, b: torch.Tensor, alpha: float = 1) -> Int8Grad:
        """``a + alpha * b`` (int8 and/or float gradients) as a fresh ``Int8Grad``, requantized row chunk by chunk.

        Autograd sums the gradients of a weight used twice in one graph (tied embeddings and output head) this way.
        """
        like = a if isinstance(a, Int8Grad) else b
        out = GradientRows(like.shape, True, like.device, like.dtype)

        def rows(t: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
            return t.dequantize_rows(r0, r1, torch.float32) if isinstance(t, Int8Grad) else t[r0:r1].float()

        for r0, r1 in row_chunks(like.shape[0], like.shape[1]):
            out.put_(r0, r1, rows(a, r0, r1).add_(rows(b, r0, r1), alpha=alpha))
        return out.result()

    def _norm(self, ord: float) -> torch.Tensor:
        if ord == 2:
            # ||g||_2 from the codes: sum over rows of scale^2 * sum(code^2), no float copy of the gradient.
            sq = self.codes.float().square().sum(dim=1, keepdim=True).mul_(self.scale.square()).sum()
            return sq.sqrt()
        return torch.linalg.vector_norm(self.dequantize(torch.float32), ord)

    def __repr__(self) -> str:
        return f"Int8Grad(shape={tuple(self.shape)}, dtype={self.dtype}, int8 codes + per-row scales)"


# ---------------------------------------------------------------- op handlers


@Int8Grad.implements(aten.detach.default, aten.alias.default)
def _detach(func, args, kwargs):
    src = args[0]
    return Int8Grad(src.codes, src.scale, src.dtype)


@Int8Grad.implements(aten.clone.default)
def _clone(func, args, kwargs):
    src = args[0]
    return Int8Grad(src.codes.clone(), src.scale.clone(), src.dtype)


@Int8Grad.implements(aten.new_empty_strided.default, aten.new_zeros.default, aten.zeros_like.default)
def _new_zeros(func, args, kwargs):
    # AccumulateGrad may allocate a fresh gradient "like" this one before copying into it.
    src = args[0]
    return Int8Grad(torch.zeros_like(src.codes), torch.ones_like(src.scale), src.dtype)


@Int8Grad.implements(aten.copy_.default)
def _copy_(func, args, kwargs):
    src, other = args[0], args[1]
    if isinstance(other, Int8Grad):
        src.codes.copy_(other.codes)
        src.scale.copy_(other.scale)
        return src
    return src._requantize_(other)


@Int8Grad.implements(aten.zero_.default)
def _zero_(func, args, kwargs):
    args[0].codes.zero_()
    return args[0]


@Int8Grad.implements(aten.mul_.Tensor, aten.mul_.Scalar, aten.div_.Tensor, aten.div_.Scalar)
def _scale_(func, args, kwargs):
    src, other = args[0], args[1]
    if isinstance(other, torch.Tensor) and other.numel() != 1:
        return NOT_HANDLED
    # Scaling a gradient (clip_grad_norm_, loss scaling) only rescales the rows: exact, no requantization.
    factor = other if not isinstance(other, torch.Tensor) else other.reshape(()).float()
    src.scale.mul_(factor) if func in (aten.mul_.Tensor, aten.mul_.Scalar) else src.scale.div_(factor)
    return src


@Int8Grad.implements(aten.add_.Tensor)
def _add_(func, args, kwargs):
    src, other = args[0], args[1]
    other = other.dequantize(torch.float32) if isinstance(other, Int8Grad) else other.float()
    # Gradient accumulation: the sum is requantized with fresh per-row scales.
    return src._requantize_(src.dequantize(torch.float32).add_(other, alpha=kwargs.get("alpha", 1)))


@Int8Grad.implements(aten.add.Tensor)
def _add(func, args, kwargs):
    src = args[0]
    if not all(isinstance(t, torch.Tensor) and t.shape == src.shape for t in args[:2]):
        return NOT_HANDLED
    return Int8Grad._sum(args[0], args[1], kwargs.get("alpha", 1))


@Int8Grad.implements(aten.linalg_vector_norm.default)
def _vector_norm(func, args, kwargs):
    src = args[0]
    ord = args[1] if len(args) > 1 else kwargs.get("ord", 2)
    if len(args) > 2 or kwargs.get("dim"):
        return NOT_HANDLED
    return src._norm(float(ord)).to(kwargs.get("dtype") or src.dtype)


class GradientRows:
    """A weight gradient assembled one chunk of rows at a time: int8 codes + row scales (``Int8Grad``) or float.

    Backward passes compute a weight's gradient chunk by chunk so that no weight-sized float tensor exists in the
    int8 case: each chunk is quantized as soon as it is complete. (It lives beside ``Int8Grad`` because it builds
    one and ``Int8Grad``'s sum uses it; in the quantizer's module the two would import each other.)
    """

    def __init__(
        self, shape: torch.Size, int8: bool, device: torch.device, dtype: torch.dtype, zero: bool = False
    ) -> None:
        """``zero``: start from the zero gradient (what :func:`quantize_grad_rows` gives an all-zero row) instead of
        uninitialized rows that every ``put_`` must cover."""
        self.int8, self.dtype = int8, dtype
        new = torch.zeros if zero else torch.empty
        if int8:
            self.codes = new(shape, dtype=torch.int8, device=device)
            rows = (shape[0], 1)
            self.scale = (
                torch.full(rows, ZERO_ROW_SCALE, dtype=torch.float32, device=device)
                if zero
                else torch.empty(rows, dtype=torch.float32, device=device)
            )
        else:
            self.grad = new(shape, dtype=dtype, device=device)

    def put_(self, r0: int, r1: int, chunk: torch.Tensor) -> None:
        """Store rows ``r0:r1`` of the gradient (``chunk``, float)."""
        if self.int8:
            self.codes[r0:r1], self.scale[r0:r1] = quantize_grad_rows(chunk)
        else:
            self.grad[r0:r1] = chunk

    def put_index_(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Store the gradient rows ``rows`` (1-D indices; ``values``: those rows, float)."""
        if self.int8:
            self.codes[rows], self.scale[rows] = quantize_grad_rows(values)
        else:
            self.grad[rows] = values.to(self.dtype)

    def result(self) -> torch.Tensor:
        return Int8Grad(self.codes, self.scale, self.dtype) if self.int8 else self.grad


__all__ = ["GradientRows", "Int8Grad"]
