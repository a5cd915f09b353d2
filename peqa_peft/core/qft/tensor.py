"""Integer tensors of QFT: the trainable weight (``QftWeight``) and its int8 gradient (``Int8Grad``).

Both are *wrapper* tensor subclasses (the design of torchao's int8 quantized training): to PyTorch, Trainer and PEFT
they look like ordinary float tensors of shape ``(out_features, in_features)`` -- they can be ``nn.Parameter``\\ s,
count ``out * in`` parameters, carry a ``.grad``, be handed to an optimizer and to ``clip_grad_norm_`` -- while the
only storage is integer codes plus small float side tensors:

- ``QftWeight``: the paper's hybrid feature quantizer. ``W = s * (q - z)`` with ``uint8`` codes ``q`` and one scale
  ``s`` / zero-point ``z`` per output channel (``peqa_peft.core.compute_qparams(bits=8)``), plus a sparse set of the
  largest-magnitude entries kept exactly in float32 (``outlier_idx`` / ``outlier_val``; the dense code there holds
  ``z``, i.e. zero). The optimizer changes the codes in whole quantization steps and the outliers in float.
- ``Int8Grad``: a weight gradient held as ``int8`` codes with one float32 scale per output row. It implements the few
  ops PyTorch applies to gradients: accumulation (``add_``, gradient accumulation), norms and in-place scaling
  (``clip_grad_norm_``, where scaling only multiplies the row scales, so clipping is exact).

Each supported op has its own handler. Any other op raises ``NotImplementedError`` instead of silently computing on
a dequantized float copy; inside ``allow_dense_fallback()`` out-of-place ops run on dequantized copies (with one
warning per op). Both types implement ``__tensor_flatten__`` / ``__tensor_unflatten__``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any, Optional, Union

import torch
from torch.utils._pytree import tree_map

from ..chunks import row_chunks
from ..quantizer import compute_qparams, quantize
from . import hooks
from .hooks import sync_grad_chunk_

aten = torch.ops.aten

WEIGHT_BITS = 8
_GRAD_MAXQ = 127
WEIGHT_FIELDS = ("codes", "scale", "zero_point", "outlier_idx", "outlier_val")


# Gradient rows whose largest entry is below this are stored as zero. They occur in an output head's rows for tokens
# far in the softmax tail (probabilities ~e^-70); once dequantized they are denormal floats, and every optimizer pass
# over denormals runs ~100x slower on CPUs (measured: IntLion steps of 15 s instead of 0.4 s on the demo model).
GRAD_ROW_FLOOR = 2.0**-100


def _quantize_grad_rows(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and float32 per-row absmax scales of a 2-D gradient block (round to nearest)."""
    g = g.float()
    absmax = g.abs().amax(dim=1, keepdim=True)
    negligible = absmax < GRAD_ROW_FLOOR
    if negligible.any():
        g = g.masked_fill(negligible, 0.0)
        absmax.masked_fill_(negligible, 0.0)
    scale = absmax.div_(_GRAD_MAXQ).clamp_min_(torch.finfo(torch.float32).tiny)
    codes = torch.div(g, scale).round_().clamp_(-_GRAD_MAXQ, _GRAD_MAXQ).to(torch.int8)
    return codes, scale


class GradientRows:
    """A weight gradient assembled one chunk of rows at a time: int8 codes + row scales (``Int8Grad``) or float.

    Backward passes compute a weight's gradient chunk by chunk so that no weight-sized float tensor exists in the
    int8 case: each chunk is quantized as soon as it is complete.
    """

    def __init__(self, shape: torch.Size, int8: bool, device: torch.device, dtype: torch.dtype) -> None:
        self.int8, self.dtype = int8, dtype
        if int8:
            self.codes = torch.empty(shape, dtype=torch.int8, device=device)
            self.scale = torch.empty(shape[0], 1, dtype=torch.float32, device=device)
        else:
            self.grad = torch.empty(shape, dtype=dtype, device=device)

    def put_(self, r0: int, r1: int, chunk: torch.Tensor) -> None:
        """Store rows ``r0:r1`` of the gradient (``chunk``, float)."""
        if self.int8:
            self.codes[r0:r1], self.scale[r0:r1] = _quantize_grad_rows(chunk)
        else:
            self.grad[r0:r1] = chunk

    def result(self) -> torch.Tensor:
        return Int8Grad(self.codes, self.scale, self.dtype) if self.int8 else self.grad


def _index_dtype(numel: int) -> torch.dtype:
    # int32 indices halve the outlier index bytes; only layers with >= 2^31 entries need int64.
    return torch.int32 if numel < 2**31 else torch.int64


_DENSE_FALLBACK = {"allowed": False, "warned": set()}


@contextlib.contextmanager
def allow_dense_fallback() -> Iterator[None]:
    """Within this block, ops without a handler run on dequantized copies (warning once per op) instead of raising.

    Every op QFT needs has its own handler; anything else would silently materialize the float weight (or
    gradient), defeating QFT's memory savings and hiding bugs, so by default it raises.
    """
    previous = _DENSE_FALLBACK["allowed"]
    _DENSE_FALLBACK["allowed"] = True
    try:
        yield
    finally:
        _DENSE_FALLBACK["allowed"] = previous


def _rewrap_fallback(cls: type, func: Any, args: tuple, kwargs: dict) -> Any:
    """Refuse ``func`` (no handler), or run it on dequantized copies inside ``allow_dense_fallback()``."""
    if func._schema.is_mutable:
        raise NotImplementedError(f"{cls.__name__} does not support the in-place op {func}; dequantize() it first")
    if not _DENSE_FALLBACK["allowed"]:
        raise NotImplementedError(
            f"{cls.__name__} has no handler for {func}: it would run on a dequantized dense copy. Call .dequantize() "
            "explicitly, or wrap the call in peqa_peft.tuners.qft.allow_dense_fallback()."
        )
    if (cls, func) not in _DENSE_FALLBACK["warned"]:
        _DENSE_FALLBACK["warned"].add((cls, func))
        warnings.warn(f"{cls.__name__}: {func} runs on a dequantized dense copy", RuntimeWarning, stacklevel=3)

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
    sync_grads: Union[bool, str] = False  # "fp32" / "int8": average gradient chunks over DDP ranks (.distributed)

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

    def __tensor_flatten__(self) -> tuple[list[str], dict[str, Any]]:
        """Inner tensors and constant metadata (the protocol torch.compile, FSDP2 and DCP use for subclasses)."""
        return list(WEIGHT_FIELDS), {
            "dtype": self.dtype,
            "int8_grad": self.int8_grad,
            "refresh_every": self.refresh_every,
        }

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, torch.Tensor], meta: dict[str, Any], outer_size, outer_stride):
        return QftWeight(
            *(inner[name] for name in WEIGHT_FIELDS), meta["dtype"], meta["int8_grad"], meta["refresh_every"]
        )

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

    def _rebuild(self, codes, scale, zero_point, outlier_idx, outlier_val) -> QftWeight:
        """A weight with these fields and this one's dtype and settings."""
        return QftWeight(
            codes, scale, zero_point, outlier_idx, outlier_val, self.dtype, self.int8_grad, self.refresh_every
        )

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The float weight ``s * (q - z)`` with the outliers written in, in ``dtype`` (default: apparent dtype)."""
        return self.dequantize_rows(0, self.shape[0], dtype)

    def outlier_range(self, r0: int, r1: int) -> tuple[int, int]:
        """``(lo, hi)``: ``outlier_idx[lo:hi]`` are the outliers of rows ``r0:r1`` (the index is sorted)."""
        if not self.outlier_idx.numel():
            return 0, 0
        # An FSDP2 shard pads its outliers with indices past every row (hooks.pad_index): they are never in range.
        bounds = torch.tensor([r0 * self.shape[1], r1 * self.shape[1]], dtype=self.outlier_idx.dtype)
        lo, hi = torch.searchsorted(self.outlier_idx, bounds.to(self.outlier_idx.device)).tolist()
        return lo, hi

    def dequantize_rows(self, r0: int, r1: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Rows ``r0:r1`` of :meth:`dequantize` (a new tensor), computed in ``dtype`` in one pass per op."""
        dtype = dtype or self.dtype
        w = self.codes[r0:r1].to(dtype)
        w.sub_(self.zero_point[r0:r1].to(dtype)).mul_(self.scale[r0:r1].to(dtype))
        lo, hi = self.outlier_range(r0, r1)
        if hi > lo:
            local = self.outlier_idx[lo:hi].long() - r0 * self.shape[1]
            w.view(-1)[local] = self.outlier_val[lo:hi].to(dtype)
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
        idx = self.outlier_idx
        used, padding = idx[: self.num_outliers], idx[self.num_outliers :]
        bad_padding = (padding != hooks.pad_index(idx.dtype)).any()  # only FSDP2 shards have padding slots
        if used.numel() and (used.min() < 0 or used.max() >= self.numel() or (used[1:] <= used[:-1]).any()):
            raise ValueError("QFT weight field 'outlier_idx' must hold distinct sorted indices into the weight")
        if bad_padding:
            raise ValueError("QFT weight field 'outlier_idx' has an index past the weight that is not padding")

    def storage_bytes(self) -> int:
        """Bytes of all tensors that store this weight."""
        return sum(t.numel() * t.element_size() for t in self.state_tensors().values())

    @property
    def num_outliers(self) -> int:
        """How many entries are float outliers (an FSDP2 shard's padding slots not counted)."""
        return self.outlier_range(0, self.shape[0])[1]

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
        if func is aten.view.dtype:  # DeepSpeed's parameter broadcast and ZeRO's flat buffers reinterpret the bytes
            raise NotImplementedError(
                "a QftWeight is stored as integer codes and cannot be viewed as a flat float buffer (DeepSpeed "
                "broadcasts and ZeRO flattens parameters that way): train QFT with DDP or FSDP2 (fully_shard)"
            )
        handled, out = _fsdp_op(src, func, args, kwargs)
        return out if handled else _rewrap_fallback(cls, func, args, kwargs)

    # FSDP2's all-gather extension (peqa_peft.integrations.distributed.fsdp): shards travel as integer fields.
    def fsdp_pre_all_gather(self, mesh, outer_size=None, outer_stride=None, module=None, mp_policy=None):
        return hooks.fsdp().pre_all_gather(self, mesh)

    def fsdp_post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
        return hooks.fsdp().post_all_gather(outputs, metadata, param_dtype, out)

    def __repr__(self) -> str:
        return (
            f"QftWeight(shape={tuple(self.shape)}, dtype={self.dtype}, int8 codes, {self.num_outliers} float "
            f"outliers, device={self.device}, requires_grad={self.requires_grad})"
        )


def _fsdp_op(src: QftWeight, func: Any, args: tuple, kwargs: dict) -> tuple[bool, Any]:
    """``(True, result)`` for the ops FSDP2's ``fully_shard`` applies to a parameter, else ``(False, None)``."""
    if func is aten.split.Tensor:
        return True, hooks.fsdp().split_rows(src, args[1], args[2] if len(args) > 2 else kwargs.get("dim", 0))
    if func is aten.new_zeros.default:
        return True, hooks.fsdp().new_zeros_shard(src, list(args[1]))
    if func is aten.new_empty.default:  # FSDP2's filler for ranks left without rows
        raise NotImplementedError(hooks.fsdp().uneven_message(src.shape[0]))
    if func is aten.slice.Tensor:
        where = {"dim": 0, "start": None, "end": None, "step": 1}
        where.update(zip(where, args[1:]), **kwargs)
        whole = (where["start"] or 0) == 0 and (where["end"] is None or where["end"] >= src.shape[0])
        if where["dim"] == 0 and whole and where["step"] == 1:
            return True, src._with(lambda t: t)  # FSDP2 narrows an evenly sharded weight to its full length
        raise NotImplementedError("a QftWeight can only be sliced whole (dequantize() it to take rows)")
    if func in (aten.view.default, aten._unsafe_view.default, aten.as_strided.default):
        if list(args[1]) in ([-1], [src.numel()], list(src.shape)):
            # FSDP2 keeps a flat view of each shard and re-strides gathered parameters; as in torchao's int8 training
            # weight, the "view" shares the fields and keeps the 2-D shape (the row scales need it).
            return True, src._with(lambda t: t)
    return False, None


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

    def __tensor_flatten__(self) -> tuple[list[str], dict[str, Any]]:
        return ["codes", "scale"], {"dtype": self.dtype}

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, torch.Tensor], meta: dict[str, Any], outer_size, outer_stride):
        return Int8Grad(inner["codes"], inner["scale"], meta["dtype"])

    @classmethod
    @torch.no_grad()
    def from_float(cls, grad: torch.Tensor, dtype: Optional[torch.dtype] = None) -> Int8Grad:
        """Round ``grad`` (2-D) to the nearest int8 code with per-row absmax scales."""
        codes, scale = _quantize_grad_rows(grad.detach())
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
        return self.codes.numel() * self.codes.element_size() + self.scale.numel() * self.scale.element_size()

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
        if func is aten.add.Tensor and all(isinstance(t, torch.Tensor) and t.shape == src.shape for t in args[:2]):
            return Int8Grad._sum(args[0], args[1], kwargs.get("alpha", 1))
        if func is aten.linalg_vector_norm.default:
            ord = args[1] if len(args) > 1 else kwargs.get("ord", 2)
            if len(args) <= 2 and not kwargs.get("dim"):
                return src._norm(float(ord)).to(kwargs.get("dtype") or src.dtype)
        return _rewrap_fallback(cls, func, args, kwargs)

    def __repr__(self) -> str:
        return f"Int8Grad(shape={tuple(self.shape)}, dtype={self.dtype}, int8 codes + per-row scales)"


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


__all__ = ["WEIGHT_FIELDS", "GradientRows", "Int8Grad", "QftWeight", "allow_dense_fallback", "qft_linear"]
