"""``QuantLinear``: a linear layer whose weight lives only as bit-packed integer codes plus scales and zero-points."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Optional

import torch
from torch import nn

from . import int4mm
from .functional import dequantize_packed, packed_linear
from .memory import tensor_bytes
from .packing import pack_bits, packed_numel
from .quantizer import QuantMethod, num_groups, quantize_weight, validate_bits, validate_group_size

# Layer types that store their weight as (in_features, out_features), e.g. transformers' Conv1D. They are registered
# from above (peqa_peft.integrations.transformers registers Conv1D), so the core imports no transformers.
_TRANSPOSED_LINEAR_TYPES: list[type] = []


def register_transposed_linear(cls: type) -> None:
    """Accept ``cls`` (a module with a ``weight`` of shape ``(in_features, out_features)``) as a linear layer."""
    if cls not in _TRANSPOSED_LINEAR_TYPES:
        _TRANSPOSED_LINEAR_TYPES.append(cls)


def is_transposed_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a registered ``(in, out)``-weight linear layer (transformers' ``Conv1D``)."""
    return isinstance(module, tuple(_TRANSPOSED_LINEAR_TYPES))


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out_features, in_features)`` weight of an ``nn.Linear`` or a transformers ``Conv1D`` (a view)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if is_transposed_linear(module):
        return module.weight.t()  # Conv1D stores (in_features, out_features)
    raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(module).__name__}")


_linear_weight = linear_weight  # the former private name, used by branches written before the re-layout


class QuantLinear(nn.Module):
    """A linear layer with a frozen ``bits``-bit weight stored bit-packed.

    Buffers (all persistent, so ``state_dict`` round-trips):

    - ``qweight``: ``uint8``, the codes packed densely (``ceil(out*in/8) * bits`` bytes),
    - ``scale``: float32 ``(out_features, n_groups)``, the step size ``s0``,
    - ``zero_point``: ``uint8`` ``(out_features, n_groups)``, the integer zero-point ``z0`` (float32 once a trained
      zero-point delta has been merged into it).

    ``forward(x)`` computes ``x @ (s0 * (q - z0))^T + bias`` in the activation dtype; PEQA adapters call it with
    tuned scales instead (``forward(x, scale=s0 + delta_s)``). No floating point copy of the weight is kept.

    In eval mode, without autograd, a 4-bit layer with bf16 activations runs PyTorch's int4 weight-packed matmul
    instead (:mod:`peqa_peft.core.int4mm`); it caches the kernel's copy of the codes (0.5 byte per weight) until
    ``train()``, ``.to()`` or :meth:`release_int4_cache`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: Optional[int] = None,
        bias: bool = True,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        validate_bits(bits)
        validate_group_size(group_size, in_features)
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        n_groups = num_groups(in_features, group_size)
        nbytes = packed_numel(in_features * out_features, bits)
        self.register_buffer("qweight", torch.zeros(nbytes, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(out_features, n_groups, dtype=torch.float32, device=device))
        self.register_buffer("zero_point", torch.zeros(out_features, n_groups, dtype=torch.uint8, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._int4_cache = int4mm.Int4Cache()

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls,
        module: nn.Module,
        bits: int,
        group_size: Optional[int] = None,
        method: QuantMethod = "mse",
        grid: int = 100,
        max_shrink: float = 0.8,
        weight: Optional[torch.Tensor] = None,
    ) -> QuantLinear:
        """Quantize an ``nn.Linear`` / ``Conv1D`` (its weight is read, not modified). See :func:`compute_qparams`.

        ``weight``: quantize this tensor instead of ``module.weight`` (same layout and shape; e.g. the checkpoint's
        float32 copy of a bfloat16 weight, see :mod:`peqa_peft.integrations.transformers.stored_weights`).
        """
        if weight is None:
            weight = linear_weight(module)
        elif is_transposed_linear(module):
            weight = weight.t()
        out_features, in_features = weight.shape
        bias = getattr(module, "bias", None)
        new = cls(in_features, out_features, bits, group_size, bias=bias is not None, device=torch.device("meta"))
        codes, scale, zero = quantize_weight(weight, bits, group_size, method, grid=grid, max_shrink=max_shrink)
        new.qweight = pack_bits(codes, bits)
        new.scale, new.zero_point = scale, zero.to(torch.uint8)
        new.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        return new

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint with a merged (fractional) zero-point stores it as float: adopt its dtype instead of truncating.
        zero_point = state_dict.get(prefix + "zero_point")
        if zero_point is not None and zero_point.dtype != self.zero_point.dtype:
            self.zero_point = torch.empty_like(self.zero_point, dtype=zero_point.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse: bool = True):
        # ``.half()``/``.to(dtype)`` may move the quantization state but never change its dtype: s0 stays float32
        # and z0 integer (as bitsandbytes keeps its quant state), so the grid, and the fingerprint of every adapter
        # trained on it, survive any cast of the model. Only the bias follows the model's dtype.
        kept = {name: getattr(self, name) for name in ("scale", "zero_point")}
        self.release_int4_cache()  # the kernel's copy is device-specific: rebuilt from the moved codes when needed
        super()._apply(fn, recurse)
        for name, tensor in kept.items():
            moved = getattr(self, name)
            if moved.dtype != tensor.dtype:
                self._buffers[name] = tensor.to(moved.device)
        return self

    @property
    def n_groups(self) -> int:
        return self.scale.shape[1]

    def train(self, mode: bool = True) -> QuantLinear:
        # The int4 kernel's copy of the codes only serves eval-mode inference: training never carries it.
        if mode:
            self.release_int4_cache()
        return super().train(mode)

    def release_int4_cache(self) -> None:
        """Free the int4 kernel's packed weight and folded scales (rebuilt by the next eligible forward)."""
        self._int4_cache = int4mm.Int4Cache()

    def int4_cache_bytes(self) -> int:
        """Bytes held by the int4 kernel's cache (0 unless an eval-mode bf16 forward built it)."""
        cache = self.__dict__.get("_int4_cache")
        return 0 if cache is None else cache.nbytes()

    def forward(
        self,
        x: torch.Tensor,
        scale: Optional[torch.Tensor] = None,
        zero_point: Optional[torch.Tensor] = None,
        qparams_sources: Optional[tuple[torch.Tensor, ...]] = None,
        qparams: Optional[Callable[[], tuple[torch.Tensor, torch.Tensor]]] = None,
    ) -> torch.Tensor:
        """``x @ (s * (q - z))^T + bias`` with ``s``/``z`` the given ones or the layer's own ``s0``/``z0``.

        ``qparams`` (instead of ``scale``/``zero_point``): a function returning them, called only when they are
        needed; it requires ``qparams_sources``, the tensors they are computed from (PEQA passes ``s0``, ``z0`` and
        the active deltas), so that the int4 path may keep its folded scales, without calling ``qparams``, until one
        of them is replaced or modified in place. Scales given directly are refolded at every int4 call.
        """
        dtype = _compute_dtype(x)
        if qparams is not None:
            if scale is not None or zero_point is not None or qparams_sources is None:
                raise ValueError("QuantLinear: pass qparams with qparams_sources, and without scale/zero_point")
            sources, trackable = qparams_sources, True
        else:
            trackable = scale is None and zero_point is None  # the layer's own buffers: their own sources
            scale = self.scale if scale is None else scale
            zero_point = self.zero_point if zero_point is None else zero_point
            sources = (scale, zero_point)
            qparams = lambda: (scale, zero_point)  # noqa: E731
        # The one dispatch point between PyTorch's int4 kernel and peqa_peft's own kernels (packed_linear).
        if int4mm.applies(self, x, dtype, sources):
            return int4mm.linear(self, x, qparams, sources, trackable)
        scale, zero_point = qparams()
        with torch.autocast(x.device.type, enabled=False):
            return packed_linear(
                x.to(dtype),
                self.qweight,
                scale,
                zero_point,
                self.bits,
                self.out_features,
                self.in_features,
                self.bias,
            )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight ``s0 * (q - z0)`` (a new tensor)."""
        return dequantize_packed(
            self.qweight, self.bits, self.out_features, self.in_features, self.scale, self.zero_point, dtype
        )

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantized weight, e.g. for export to tools without PEQA support."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.dequantize(dtype), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(dtype).clone(), requires_grad=False)
        return linear

    def fingerprint(self, scale: Optional[torch.Tensor] = None) -> str:
        """A short hash of the quantization grid (bits, group size, shape, ``s0`` and ``z0``).

        ``s0`` enters rounded to bfloat16 so that bit-level noise (e.g. from merging and unmerging an adapter) does
        not change the hash, while a different base model or quantization setting does.
        """
        scale = self.scale if scale is None else scale
        h = hashlib.sha256(f"{self.bits}|{self.group_size}|{self.out_features}x{self.in_features}".encode())
        h.update(scale.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
        zero = self.zero_point.detach().to("cpu")
        if zero.is_floating_point() and not torch.equal(zero, zero.round()):
            # Fractional zero-points (GGUF Q4_1/K-quant mins, merged zero-point deltas) enter like s0, rounded to
            # bfloat16: truncating them to integers would let two different grids share a fingerprint.
            h.update(b"z:bf16")
            h.update(zero.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
        else:  # integral zero-points hash as before, so existing adapters keep their fingerprints
            h.update(zero.to(torch.int16).numpy().tobytes())
        return h.hexdigest()[:16]

    def memory_bytes(self) -> dict[str, int]:
        """Resident bytes of this layer's tensors: packed codes, scales + zero-points, bias."""
        qparams = tensor_bytes(self.scale) + tensor_bytes(self.zero_point)
        bias = 0 if self.bias is None else tensor_bytes(self.bias)
        return {"codes": tensor_bytes(self.qweight), "qparams": qparams, "bias": bias}

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer would compute in: the autocast dtype when autocast is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type) and x.dtype.is_floating_point:
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype
