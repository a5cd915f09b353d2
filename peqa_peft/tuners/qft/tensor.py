"""Integer tensors of QFT: the trainable weight (``QftWeight``) and its int8 gradient (``Int8Grad``).

Both are *wrapper* tensor subclasses (the design of torchao's int8 quantized training): to PyTorch, Trainer and PEFT
they look like ordinary float tensors of shape ``(out_features, in_features)`` -- they can be ``nn.Parameter``\\ s,
count ``out * in`` parameters, carry a ``.grad``, be handed to an optimizer and to ``clip_grad_norm_`` -- while the
only storage is integer codes plus small float side tensors:

- ``QftWeight``: the paper's hybrid feature quantizer. ``W = s * (q - z)`` with ``uint8`` codes ``q`` and one scale
  ``s`` / zero-point ``z`` per output channel (``peqa_peft.quant.compute_qparams(bits=8)``), plus a sparse set of the
  largest-magnitude entries kept exactly in float32 (``outlier_idx`` / ``outlier_val``; the dense code there holds
  ``z``, i.e. zero). The optimizer changes the codes in whole quantization steps and the outliers in float.
- ``Int8Grad``: a weight gradient held as ``int8`` codes with one float32 scale per output row. It implements the few
  ops PyTorch applies to gradients: accumulation (``add_``, gradient accumulation), norms and in-place scaling
  (``clip_grad_norm_``, where scaling only multiplies the row scales, so clipping is exact).

Any other op on either tensor falls back to computing on the dequantized float tensor (out of place), and in-place
ops that are not implemented raise, so nothing silently writes into a temporary.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.utils._pytree import tree_map

from ...quant.functional import dequantize_codes
from ...quant.quantizer import compute_qparams, quantize

aten = torch.ops.aten

WEIGHT_BITS = 8
_MAXQ = 2**WEIGHT_BITS - 1
_GRAD_MAXQ = 127
WEIGHT_FIELDS = ("codes", "scale", "zero_point", "outlier_idx", "outlier_val")


def _index_dtype(numel: int) -> torch.dtype:
    # int32 indices halve the outlier index bytes; only layers with >= 2^31 entries need int64.
    return torch.int32 if numel < 2**31 else torch.int64


def _rewrap_fallback(cls: type, func: Any, args: tuple, kwargs: dict) -> Any:
    """Run ``func`` on dequantized copies; refuse in-place ops, whose result would be lost."""
    if func._schema.is_mutable:
        raise NotImplementedError(f"{cls.__name__} does not support the in-place op {func}; dequantize() it first")

    def unwrap(t: Any) -> Any:
        return t.dequantize() if isinstance(t, (QftWeight, Int8Grad)) else t

    return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))


class QftWeight(torch.Tensor):
    """A linear weight stored as per-channel int8 codes plus float outliers (see the module docstring).

    Its apparent dtype is the activation dtype of the layer it came from (the dtype of forward/backward math and of
    float gradients); ``dequantize()`` materializes the float weight as a temporary.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    outlier_idx: torch.Tensor
    outlier_val: torch.Tensor

    @staticmethod
    def __new__(cls, codes, scale, zero_point, outlier_idx, outlier_val, dtype, int8_grad=True, refresh_every=0):
        return torch.Tensor._make_wrapper_subclass(
            cls, codes.shape, dtype=dtype, device=codes.device, requires_grad=False
        )

    def __init__(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        outlier_idx: torch.Tensor,
        outlier_val: torch.Tensor,
        dtype: torch.dtype,
        int8_grad: bool = True,
        refresh_every: int = 0,
    ) -> None:
        self.codes, self.scale, self.zero_point = codes, scale, zero_point
        self.outlier_idx, self.outlier_val = outlier_idx, outlier_val
        self.int8_grad = int8_grad
        self.refresh_every = refresh_every

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    @torch.no_grad()
    def from_float(
        cls,
        weight: torch.Tensor,
        outlier_fraction: float = 0.01,
        int8_grad: bool = True,
        refresh_every: int = 0,
        method: str = "minmax",
    ) -> QftWeight:
        """Quantize a float ``(out_features, in_features)`` weight (read, not modified)."""
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"expected a 2-D float weight, got {weight.dtype} of shape {tuple(weight.shape)}")
        w = weight.detach().float().contiguous()  # Conv1D hands in a transposed view
        k = int(round(outlier_fraction * w.numel()))
        idx = torch.topk(w.abs().flatten(), k, sorted=False).indices.sort().values if k else w.new_zeros(0).long()
        dense = w.clone()
        dense.view(-1)[idx] = 0.0  # outliers live only in float: they must not stretch the int8 range
        scale, zero = compute_qparams(dense, bits=WEIGHT_BITS, method=method)
        codes = quantize(dense, scale, zero, WEIGHT_BITS)
        vals = w.view(-1)[idx].clone()
        return cls(codes, scale, zero, idx.to(_index_dtype(w.numel())), vals, weight.dtype, int8_grad, refresh_every)

    def _with(self, fn, dtype: Optional[torch.dtype] = None) -> QftWeight:
        tensors = [fn(getattr(self, name)) for name in WEIGHT_FIELDS]
        return QftWeight(*tensors, dtype or self.dtype, self.int8_grad, self.refresh_every)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The float weight ``s * (q - z)`` with the outliers written in, in ``dtype`` (default: apparent dtype)."""
        w = dequantize_codes(self.codes, self.scale, self.zero_point, dtype or self.dtype)
        if self.outlier_idx.numel():
            w.view(-1)[self.outlier_idx.long()] = self.outlier_val.to(w.dtype)
        return w

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The plain tensors that define this weight (what ``state_dict`` and safetensors hold)."""
        return {name: getattr(self, name) for name in WEIGHT_FIELDS}

    @torch.no_grad()
    def load_state_tensors_(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved ``state_tensors`` into this weight in place (shapes must match)."""
        for name in WEIGHT_FIELDS:
            own, new = getattr(self, name), tensors[name]
            if own.shape != new.shape:
                raise ValueError(
                    f"QFT weight field '{name}' has shape {tuple(new.shape)}, expected {tuple(own.shape)}"
                )
            own.copy_(new)

    def storage_bytes(self) -> int:
        """Bytes of all tensors that store this weight."""
        return sum(t.numel() * t.element_size() for t in self.state_tensors().values())

    @property
    def num_outliers(self) -> int:
        return self.outlier_idx.numel()

    @torch.no_grad()
    def lion_update_(
        self, direction: torch.Tensor, lr: float, weight_decay: float, generator: Optional[torch.Generator]
    ) -> None:
        """Apply ``W <- W - lr * (direction + weight_decay * W)`` to the integer codes and the float outliers.

        In code units the dense update is ``-(lr / s) * direction - lr * weight_decay * (q - z)`` per entry; it is
        stochastically rounded to whole steps (unbiased, so sub-step learning rates still move weights on average)
        and clamped to ``[0, 255]``. Outliers take the same update exactly, in float.
        """
        from ...quant.stochastic import stochastic_round

        codes = self.codes.float()
        update = direction.float() * (-lr / self.scale)
        if weight_decay:
            update.add_(codes - self.zero_point, alpha=-lr * weight_decay)
        codes = stochastic_round(update.add_(codes), generator).clamp_(0, _MAXQ)
        if self.num_outliers:
            idx = self.outlier_idx.long()
            codes.view(-1)[idx] = self.zero_point.expand_as(codes).reshape(-1)[idx]
            self.outlier_val.mul_(1.0 - lr * weight_decay).sub_(direction.reshape(-1)[idx].float(), alpha=lr)
        self.codes.copy_(codes)

    @torch.no_grad()
    def reselect_outliers_(self) -> None:
        """Make the currently largest-magnitude entries the outliers, keeping the per-channel grid fixed.

        Entries that leave the outlier set are rounded onto the (unchanged) int8 grid; entries that join it are
        exact already, so only the leavers incur a rounding error.
        """
        k = self.num_outliers
        if not k:
            return
        w = self.dequantize(torch.float32)
        idx = torch.topk(w.abs().flatten(), k, sorted=False).indices.sort().values
        codes = torch.round(w / self.scale + self.zero_point).clamp_(0, _MAXQ)
        codes.view(-1)[idx] = self.zero_point.expand_as(codes).reshape(-1)[idx]
        self.outlier_val.copy_(w.view(-1)[idx])
        self.outlier_idx.copy_(idx)
        self.codes.copy_(codes)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        src = args[0] if args else None
        if func in (aten.detach.default, aten.alias.default):
            # Parameter creation, `.data` and state_dict detach: share the integer storage.
            return src._with(lambda t: t)
        if func is aten.clone.default:
            return src._with(torch.clone)
        if func is aten._to_copy.default:
            device, dtype = kwargs.get("device"), kwargs.get("dtype")
            # The apparent dtype follows the model (e.g. `.half()`); the integer storage never changes dtype.
            return src._with(lambda t: t.to(device=device) if device is not None else t.clone(), dtype)
        if func is aten.copy_.default and isinstance(args[1], QftWeight):
            src.load_state_tensors_(args[1].state_tensors())
            return src
        return _rewrap_fallback(cls, func, args, kwargs)

    def __repr__(self) -> str:
        return (
            f"QftWeight(shape={tuple(self.shape)}, dtype={self.dtype}, int8 codes, {self.num_outliers} float "
            f"outliers, device={self.device}, requires_grad={self.requires_grad})"
        )


class Int8Grad(torch.Tensor):
    """A gradient stored as ``int8`` codes in ``[-127, 127]`` with a float32 scale per leading-dim row."""

    codes: torch.Tensor
    scale: torch.Tensor

    @staticmethod
    def __new__(cls, codes, scale, dtype):
        return torch.Tensor._make_wrapper_subclass(cls, codes.shape, dtype=dtype, device=codes.device)

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
        self.codes, self.scale = codes, scale

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    @torch.no_grad()
    def from_float(cls, grad: torch.Tensor, dtype: Optional[torch.dtype] = None) -> Int8Grad:
        """Round ``grad`` (2-D) to the nearest int8 code with per-row absmax scales."""
        g = grad.detach().float()
        scale = g.abs().amax(dim=1, keepdim=True).div_(_GRAD_MAXQ).clamp_min_(torch.finfo(torch.float32).tiny)
        codes = torch.round(g / scale).clamp_(-_GRAD_MAXQ, _GRAD_MAXQ).to(torch.int8)
        return cls(codes, scale, dtype or grad.dtype)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The float gradient ``codes * scale``."""
        return self.codes.to(dtype or self.dtype) * self.scale.to(dtype or self.dtype)

    def storage_bytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scale.numel() * self.scale.element_size()

    def _requantize_(self, value: torch.Tensor) -> Int8Grad:
        fresh = Int8Grad.from_float(value, self.dtype)
        self.codes.copy_(fresh.codes)
        self.scale.copy_(fresh.scale)
        return self

    def _norm(self, ord: float) -> torch.Tensor:
        if ord == 2:
            # ||g||_2 from the codes: sum over rows of scale^2 * sum(code^2), no float copy of the gradient.
            sq = self.codes.float().square().sum(dim=1, keepdim=True).mul_(self.scale.square()).sum()
            return sq.sqrt()
        return torch.linalg.vector_norm(self.dequantize(torch.float32), ord)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        src = args[0] if args else None
        if func in (aten.detach.default, aten.alias.default):
            return Int8Grad(src.codes, src.scale, src.dtype)
        if func is aten.clone.default:
            return Int8Grad(src.codes.clone(), src.scale.clone(), src.dtype)
        if func in (aten.new_empty_strided.default, aten.new_zeros.default, aten.zeros_like.default):
            # AccumulateGrad may allocate a fresh gradient "like" this one before copying into it.
            return Int8Grad(torch.zeros_like(src.codes), torch.ones_like(src.scale), src.dtype)
        if func is aten.copy_.default:
            other = args[1]
            if isinstance(other, Int8Grad):
                src.codes.copy_(other.codes)
                src.scale.copy_(other.scale)
                return src
            return src._requantize_(other)
        if func is aten.zero_.default:
            src.codes.zero_()
            return src
        if func in (aten.mul_.Tensor, aten.mul_.Scalar, aten.div_.Tensor, aten.div_.Scalar):
            other = args[1]
            if not isinstance(other, torch.Tensor) or other.numel() == 1:
                # Scaling a gradient (clip_grad_norm_, loss scaling) only rescales the rows: exact, no requantization.
                factor = other if not isinstance(other, torch.Tensor) else other.reshape(()).float()
                src.scale.mul_(factor) if func in (aten.mul_.Tensor, aten.mul_.Scalar) else src.scale.div_(factor)
                return src
        if func is aten.add_.Tensor:
            other = args[1]
            other = other.dequantize(torch.float32) if isinstance(other, Int8Grad) else other.float()
            # Gradient accumulation: the sum is requantized with fresh per-row scales.
            return src._requantize_(src.dequantize(torch.float32).add_(other, alpha=kwargs.get("alpha", 1)))
        if func is aten.linalg_vector_norm.default:
            ord = args[1] if len(args) > 1 else kwargs.get("ord", 2)
            if len(args) <= 2 and not kwargs.get("dim"):
                return src._norm(float(ord)).to(kwargs.get("dtype") or src.dtype)
        return _rewrap_fallback(cls, func, args, kwargs)

    def __repr__(self) -> str:
        return f"Int8Grad(shape={tuple(self.shape)}, dtype={self.dtype}, int8 codes + per-row scales)"


class _QftLinearFn(torch.autograd.Function):
    """``x @ W^T`` where ``W`` is a ``QftWeight``; the dequantized ``W`` is a temporary of each pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: QftWeight) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return x @ weight.dequantize(x.dtype).t()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        # Under autocast grad_out may be in a lower precision than the saved input: compute in grad_out's dtype.
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ weight.dequantize(grad_out.dtype)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            # The full weight gradient of this one layer, in the activation dtype; quantized right away if asked.
            g = grad_out.reshape(-1, grad_out.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(grad_out.dtype)
            grad_w = Int8Grad.from_float(g, weight.dtype) if weight.int8_grad else g.to(weight.dtype)
        return grad_x, grad_w


def qft_linear(x: torch.Tensor, weight: QftWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W^T + bias`` with gradients to ``x`` and to the integer weight (float or ``Int8Grad``)."""
    if not isinstance(weight, QftWeight):
        raise TypeError(f"qft_linear expects a QftWeight, got {type(weight).__name__}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"input has {x.shape[-1]} features, the weight expects {weight.shape[1]}")
    out = _QftLinearFn.apply(x, weight)
    return out if bias is None else out + bias.to(out.dtype)


__all__ = ["WEIGHT_FIELDS", "Int8Grad", "QftWeight", "qft_linear"]
