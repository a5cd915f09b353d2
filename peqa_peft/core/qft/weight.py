"""``QftWeight``: QFT's trainable linear weight, int8 codes with per-channel scales plus float outliers.

A *wrapper* tensor subclass (the design of torchao's int8 quantized training): to PyTorch, Trainer and PEFT it looks
like an ordinary float tensor of shape ``(out_features, in_features)`` -- it can be an ``nn.Parameter``, count
``out * in`` parameters, carry a ``.grad``, be handed to an optimizer -- while the only storage is integer codes
plus small float side tensors. It is the paper's hybrid feature quantizer: ``W = s * (q - z)`` with ``uint8`` codes
``q`` and one scale ``s`` / zero-point ``z`` per output channel (``peqa_peft.core.compute_qparams(bits=8)``), plus a
sparse set of the largest-magnitude entries kept exactly in float32 (``outlier_idx`` / ``outlier_val``; the dense
code there holds ``z``, i.e. zero). The optimizer changes the codes in whole quantization steps and the outliers in
float (:mod:`peqa_peft.optim.integer_update`, against the fields and methods documented here).

Each supported aten op has its own handler below (``@QftWeight.implements``); FSDP2's sharding ops are in
:mod:`peqa_peft.core.qft.fsdp_ops`; anything else is refused (:mod:`peqa_peft.core.qft.dispatch`).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from .. import kernels
from ..memory import tensor_bytes
from ..quantizer import quantize_weight
from . import fsdp_ops, hooks
from .dispatch import NOT_HANDLED, IntegerTensor

aten = torch.ops.aten

WEIGHT_BITS = 8
WEIGHT_FIELDS = ("codes", "scale", "zero_point", "outlier_idx", "outlier_val")


def _index_dtype(numel: int) -> torch.dtype:
    # int32 indices halve the outlier index bytes; only layers with >= 2^31 entries need int64.
    return torch.int32 if numel < 2**31 else torch.int64


def dequantize_codes(codes, zero, scale, dtype: torch.dtype) -> torch.Tensor:
    """``scale * (codes - zero)`` of some rows' codes in ``dtype``, outliers not written in (they are sparse: the
    caller writes them after)."""
    # uint8 - float promotes: the codes are read once, no separate cast pass (eager)
    return torch.sub(codes, zero.to(dtype)).mul_(scale.to(dtype))


class QftWeight(IntegerTensor):
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
        codes, scale, zero = quantize_weight(dense, WEIGHT_BITS, method=method)
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
        """Rows ``r0:r1`` of :meth:`dequantize` (a new tensor): one compiled pass for large float32 chunks in compiled
        kernel mode, else op by op (the same values: a subtraction and a multiplication, each rounded once)."""
        dtype = dtype or self.dtype
        codes, zero, scale = self.codes[r0:r1], self.zero_point[r0:r1], self.scale[r0:r1]
        w = None
        # float32 only: a compiled kernel keeps a lower-precision intermediate in float32, eager rounds it
        if dtype == torch.float32 and kernels.compiles(codes.numel()):
            w = kernels.run_compiled("qft_dequant_rows", dequantize_codes, codes, zero, scale, dtype)
        if w is None:
            w = dequantize_codes(codes, zero, scale, dtype)
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
        return sum(tensor_bytes(t) for t in self.state_tensors().values())

    @property
    def num_outliers(self) -> int:
        """How many entries are float outliers (an FSDP2 shard's padding slots not counted)."""
        return self.outlier_range(0, self.shape[0])[1]

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


# ---------------------------------------------------------------- op handlers


@QftWeight.implements(aten.detach.default, aten.alias.default)
def _detach(func, args, kwargs):
    # Parameter creation, `.data` and state_dict detach: share the integer storage.
    return args[0]._with(lambda t: t)


@QftWeight.implements(aten.clone.default)
def _clone(func, args, kwargs):
    return args[0]._with(torch.clone)


@QftWeight.implements(aten._to_copy.default)
def _to_copy(func, args, kwargs):
    device, dtype = kwargs.get("device"), kwargs.get("dtype")
    # The apparent dtype follows the model (e.g. `.half()`); the integer storage never changes dtype.
    return args[0]._with(lambda t: t.to(device=device) if device is not None else t.clone(), dtype)


@QftWeight.implements(aten.copy_.default)
def _copy_(func, args, kwargs):
    if not isinstance(args[1], QftWeight):
        return NOT_HANDLED  # an in-place op: refused
    args[0].load_state_tensors_(args[1].state_tensors())
    return args[0]


@QftWeight.implements(aten.view.dtype)
def _view_dtype(func, args, kwargs):
    # DeepSpeed's parameter broadcast and ZeRO's flat buffers reinterpret the bytes
    raise NotImplementedError(
        "a QftWeight is stored as integer codes and cannot be viewed as a flat float buffer (DeepSpeed "
        "broadcasts and ZeRO flattens parameters that way): train QFT with DDP or FSDP2 (fully_shard)"
    )


for _op, _handler in fsdp_ops.HANDLERS.items():
    QftWeight.implements(_op)(_handler)


__all__ = ["WEIGHT_BITS", "WEIGHT_FIELDS", "QftWeight", "dequantize_codes"]
