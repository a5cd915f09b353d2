"""bf16 inference of 4-bit layers through PyTorch's int4 weight-packed matmul (tinygemm).

PyTorch ships a fused int4-weight x bf16-activation matmul: ``aten._weight_int4pack_mm_for_cpu`` (its weight packed
by ``aten._convert_weight_to_int4pack_for_cpu``) and, on CUDA (compute capability >= 8.0),
``aten._weight_int4pack_mm`` (packed by ``aten._convert_weight_to_int4pack``); torchao's ``Int4CPULayout`` /
``TensorCoreTiledLayout`` use the same pairs. Its weight is ``w = (q - 8) * scale + zero`` per group of ``g`` input
columns, ``g`` in 32/64/128/256, with ``scale`` and ``zero`` stored as a ``(n_groups, out_features, 2)`` tensor in the
activation dtype. A 4-bit PEQA weight ``s * (q - z0)`` (``s = s0 + Δs``, ``z0`` possibly fractional) folds into it as

    scale = bf16(s),  zero = bf16(scale * (8 - z0))

(the zero is formed from the *rounded* scale, so the kernel's weight is ``bf16(s) * (q - z0)`` up to one bf16
rounding of the zero term, and then the kernel's own rounding of its product to bf16). The codes ``q`` are PEQA's
unchanged. It is not exact against the fp32 dequantization (bf16 has an 8-bit significand); the measured error is in
docs/guides/peqa.md ("bf16 decode"). That is why it is used only for bf16 activations, never for fp32 or fp16.

When it is used (:func:`int4_group_size` and :func:`applies`; otherwise today's kernels run, unchanged):
``bits == 4``; at most :data:`MAX_ROWS` tokens per call (decode; prefill keeps today's kernels); the layer in eval
mode (``module.eval()``); no gradient needed (``torch.no_grad()`` /
``torch.inference_mode()``, or nothing that requires grad); bf16 activations (or bf16 autocast); a group size the
kernel has (32/64/128/256; a per-channel layer counts as one group of ``in_features`` when that is one of them);
on CPU ``out_features % 16 == 0``, on CUDA ``out_features % 8 == 0`` and ``in_features % 128 == 0``; and the switch
below on. The kernel-packed weight and the folded scale/zero pairs are cached on the layer (see :class:`Int4Cache`).

The one process-wide setting is the switch :func:`set_enabled` (``PEQA_INT4_MATMUL=0`` in the environment turns it
off at import); ``PEQA_KERNELS=reference`` turns it off as well, so the reference mode stays the plain-PyTorch path.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Optional

import torch

from . import kernels

GROUP_SIZES = (32, 64, 128, 256)
# Rows (tokens) per call up to which the int4 kernel runs. It is a decode kernel: on the idle 2-core AMX CPU here
# (2026-12-07) it beat peqa_peft's kernels 1.8-3.2x at 1-16 rows of a 2048 x 2048 layer, lost 1.1x at 32 rows and up
# to 3x at 64-128 rows (prefill), where dequantizing blocks and running the bf16 GEMM wins
# (benchmarks/bf16_decode.py --rows-sweep, results in benchmarks/results/bf16-decode).
MAX_ROWS = 16
_ENV_VAR = "PEQA_INT4_MATMUL"
# CUDA tinygemm: k-tiles of 16 packed 8 at a time (the fastest layout; torchao's default inner_k_tiles), n-tiles of 8.
_CUDA_INNER_K_TILES = 8

_enabled: Optional[bool] = None


def enabled() -> bool:
    """Whether eligible layers use the int4 kernel (``PEQA_INT4_MATMUL``, default on; off in reference mode)."""
    global _enabled
    if _enabled is None:
        value = os.environ.get(_ENV_VAR, "1").strip().lower()
        if value not in ("0", "1", "true", "false", "on", "off"):
            raise ValueError(f"{_ENV_VAR}={value!r}: expected 1/0 (or true/false, on/off)")
        _enabled = value in ("1", "true", "on")
    return _enabled and kernels.kernel_mode() != "reference"


def set_enabled(flag: bool) -> None:
    """Turn the int4 path on or off for this process (the only global state of this module)."""
    global _enabled
    if not isinstance(flag, bool):
        raise TypeError(f"set_enabled expects a bool, got {type(flag).__name__}")
    _enabled = flag


def int4_group_size(bits: int, out_features: int, in_features: int, n_groups: int, device: torch.device):
    """The group size to give the kernel for this layer shape on ``device``, or None when it has no kernel."""
    if bits != 4 or in_features % n_groups:
        return None
    group = in_features // n_groups  # per channel (n_groups == 1): one group of in_features
    if group not in GROUP_SIZES:
        return None
    if device.type == "cpu":
        return group if out_features % 16 == 0 else None  # _convert_weight_to_int4pack_for_cpu: N % 16
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (8, 0):  # tinygemm needs sm80's bf16 mma
            return None
        if out_features % 8 or in_features % (_CUDA_INNER_K_TILES * 16):
            return None
        return group
    return None


def applies(module, x: torch.Tensor, dtype: torch.dtype, qparams_sources: tuple[torch.Tensor, ...]) -> bool:
    """Whether ``module`` (a QuantLinear) computes ``x`` (in compute ``dtype``) with the int4 kernel.

    ``qparams_sources``: the tensors its scale and zero-point come from (a gradient is needed if one requires it).
    Called on every forward of every quantized layer, so the cheap tests come first (a decode step calls it
    ~150 times for a 1B model).
    """
    if dtype is not torch.bfloat16 or module.training or module.bits != 4 or not enabled():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in qparams_sources)):
        return False
    numel = x.numel()
    if numel == 0 or numel > MAX_ROWS * module.in_features:
        return False
    qweight = module.qweight
    if qweight.is_meta or x.device != qweight.device:
        return False
    return _group(module, x.device) is not None


def _group(module, device: torch.device) -> Optional[int]:
    """:func:`int4_group_size` for ``module`` on ``device``, remembered per (device, number of groups)."""
    n_groups = module.scale.shape[1]
    key = (device, n_groups)
    memo = module.__dict__.get("_int4_group")
    if memo is None or memo[0] != key:
        memo = (key, int4_group_size(module.bits, module.out_features, module.in_features, n_groups, device))
        module.__dict__["_int4_group"] = memo
    return memo[1]


def _versioned(tensors: tuple[torch.Tensor, ...]) -> Optional[tuple]:
    """A key that changes whenever one of ``tensors`` is replaced or modified in place (None: not trackable).

    ``(tensors, stamps)``: each tensor's identity, storage address (``p.data = ...`` keeps the object but swaps the
    storage) and version counter (bumped by every in-place op: optimizer steps, ``merge()``, ``load_state_dict``,
    ``copy_``). The key holds the tensors themselves, so no other tensor can take one of their ``id``s while it
    lives, and two keys compare by their integer stamps alone (cheap: this runs on every forward). Inference-mode
    tensors have no version counter: those are not cached.
    """
    stamps = []
    for t in tensors:
        if t.is_inference():
            return None
        stamps.append((id(t), t.data_ptr(), t._version))
    return tuple(tensors), tuple(stamps)


def _same(a: Optional[tuple], b: Optional[tuple]) -> bool:
    return a is not None and b is not None and a[1] == b[1]


def pack_weight(codes: torch.Tensor) -> torch.Tensor:
    """The kernel's packed form of ``(out, in)`` integer codes 0..15 (0.5 byte per weight, like PEQA's own)."""
    if codes.device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    # CUDA: two codes per byte, the even column in the high nibble (PyTorch >= 2.5), then the tensor-core tiling.
    pairs = codes.to(torch.uint8)
    nibbles = (pairs[:, ::2] << 4 | pairs[:, 1::2]).contiguous()
    return torch.ops.aten._convert_weight_to_int4pack(nibbles, _CUDA_INNER_K_TILES)


def fold_qparams(scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """PEQA's ``s * (q - z0)`` as the kernel's bf16 pairs ``(bf16(s), bf16(bf16(s) * (8 - z0)))``.

    The zero term is formed from the rounded scale: the kernel's weight is then ``bf16(s) * (q - z0)`` plus one bf16
    rounding of the zero term (forming it from the unrounded ``s`` would add ``(8 - z0) * (s - bf16(s))`` on top).
    """
    s = scale.detach().float().to(torch.bfloat16)
    zero = (s.float() * (8.0 - zero_point.detach().float())).to(torch.bfloat16)
    return torch.stack([s, zero], -1).transpose(0, 1).contiguous()


def matmul(x2: torch.Tensor, packed: torch.Tensor, group: int, scale_and_zero: torch.Tensor) -> torch.Tensor:
    """``x2 @ W^T`` for a 2-D contiguous bf16 ``x2`` (``(T, in)``), bf16 ``(T, out)``."""
    if x2.device.type == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group, scale_and_zero)
    return torch.ops.aten._weight_int4pack_mm(x2, packed, group, scale_and_zero)


class Int4Cache:
    """The kernel-packed weight and folded bf16 scale/zero pairs of one layer, rebuilt when their sources change.

    - ``weight``: built from ``qweight`` on the first eligible forward, kept until ``qweight`` is replaced or modified
      (its key: :func:`_versioned`), the layer goes back to ``train()`` or moves (``.to()``), or
      :meth:`~peqa_peft.core.QuantLinear.release_int4_cache`. It duplicates the codes (0.5 byte per weight) because
      the kernel needs its own tiling; building it only in eval mode and dropping it in ``train()`` keeps training
      memory as it was.
    - ``scale_and_zero``: refolded whenever any tensor the scales come from changes (``s0``, ``z0`` and the active
      adapters' ``Δs``/``Δz``, passed as ``qparams_key``); with no key (scales of unknown origin) it is refolded at
      every call, so a stale scale is never served.
    """

    __slots__ = ("weight", "weight_key", "scale_and_zero", "qparams_key")

    def __init__(self) -> None:
        self.weight = self.weight_key = self.scale_and_zero = self.qparams_key = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scale_and_zero) if t is not None)


def linear(module, x: torch.Tensor, qparams: Callable, qparams_sources: tuple, trackable: bool) -> torch.Tensor:
    """``x @ (s * (q - z0))^T + bias`` in bf16 for a QuantLinear for which :func:`applies` holds.

    ``qparams()`` returns ``(s, z0)``; it is called only when the cached folded pairs are not current for
    ``qparams_sources`` (``trackable`` False: they never are, refold every call).
    """
    from .functional import unpack_codes

    cache = module.__dict__.get("_int4_cache")
    if cache is None:  # a QuantLinear built without __init__ (e.g. unpickled from an older version)
        cache = module._int4_cache = Int4Cache()
    qweight = module.qweight
    weight_key = _versioned((qweight,))
    if cache.weight is None or not _same(cache.weight_key, weight_key):
        codes = unpack_codes(qweight, module.bits, module.out_features, module.in_features)
        cache.weight, cache.weight_key = pack_weight(codes), weight_key
        cache.scale_and_zero = cache.qparams_key = None
    qparams_key = _versioned(qparams_sources) if trackable else None
    if cache.scale_and_zero is None or not _same(cache.qparams_key, qparams_key):
        cache.scale_and_zero, cache.qparams_key = fold_qparams(*qparams()), qparams_key
    x2 = x.reshape(-1, module.in_features)
    if x2.dtype is not torch.bfloat16:
        x2 = x2.to(torch.bfloat16)
    group = module.in_features // module.scale.shape[1]  # applies() checked the kernel takes it
    out = matmul(x2.contiguous(), cache.weight, group, cache.scale_and_zero)
    bias = module.bias
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.view(*x.shape[:-1], module.out_features)


__all__ = [
    "GROUP_SIZES",
    "Int4Cache",
    "applies",
    "enabled",
    "fold_qparams",
    "int4_group_size",
    "linear",
    "matmul",
    "pack_weight",
    "set_enabled",
]
