r"""Read GPTQ-format linear layers (``qweight``/``qzeros``/``scales``/``g_idx``) into ``QuantLinear``\ s.

This is the layout GPTQModel and AutoGPTQ load GPTQ checkpoints into (transformers' GPTQ integration builds
GPTQModel's ``BaseQuantLinear`` subclasses). The reader is duck-typed on that layout, so it does not import either
library:

- ``qweight``: integer words ``(in_features * bits / word_bits, out_features)``; each output column holds its
  ``in_features`` codes as one little-endian bit stream, ``bits`` bits per code, lowest bits first (for 2/4/8 bits
  that is ``word_bits / bits`` codes per word; GPTQ's 3-bit layout lets codes straddle words, which is the same
  stream). The codes are unsigned, ``W = scale * (q - zero)``.
- ``qzeros``: the zero-points packed the same way along the output dimension, ``(n_groups, out * bits / word_bits)``.
  In the original ("v1") GPTQ format they are stored minus one; GPTQModel converts them to the true values ("v2")
  when its kernel says ``REQUIRES_FORMAT_V2``. A layer counts as v2 when it has ``REQUIRES_FORMAT_V2 = True``
  or ``qzero_format() == 2``, else as v1.
- ``scales``: ``(n_groups, out_features)``; ``g_idx``: the group of each input column.

Because a column's bit stream is exactly PEQA's packing of that row (PEQA packs row-major, lowest bits first), the
transposed words' bytes are read with PEQA's own ``unpack_bits`` (and PEQA's packed codes equal those bytes).
Activation-ordered
checkpoints (``desc_act=True`` with a ``g_idx`` that is not ``column // group_size``) are refused: PEQA's groups are
contiguous column ranges. Requires a little-endian host (every platform torch ships for).

PEFT glue (checking a layer against a ``PeqaConfig``) is in :mod:`peqa_peft.tuners.peqa.backends.gptq`.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from ....core import QuantLinear, unpack_bits, validate_bits
from ... import validation
from ..quant_linear import quant_linear_from_codes

_BUFFERS = ("qweight", "qzeros", "scales")


def is_gptq_layer(module: nn.Module) -> bool:
    """Whether ``module`` has the GPTQ layout (duck-typed: ``qweight``/``qzeros``/``scales`` tensors and ``bits``)."""
    return all(isinstance(getattr(module, name, None), torch.Tensor) for name in _BUFFERS) and hasattr(module, "bits")


def _shape(module: nn.Module) -> tuple[int, int]:
    out_features = module.scales.shape[1]
    word_bits = module.qweight.element_size() * 8
    in_features = getattr(module, "in_features", module.qweight.shape[0] * word_bits // module.bits)
    return out_features, in_features


def group_size(module: nn.Module) -> int | None:
    """PEQA's group size of the layer: ``None`` for one group per output channel."""
    _, in_features = _shape(module)
    n_groups = module.scales.shape[0]
    return None if n_groups == 1 else in_features // n_groups


def describe(module: nn.Module) -> str:
    """A short description of the layer's grid, for error messages."""
    gs = group_size(module)
    return f"GPTQ {module.bits}-bit {'per channel' if gs is None else f'group_size={gs}'}"


def _is_v2(module: nn.Module) -> bool:
    qzero_format = getattr(module, "qzero_format", None)
    if callable(qzero_format):
        return qzero_format() == 2
    return bool(getattr(module, "REQUIRES_FORMAT_V2", False))


def check_layer(module: nn.Module, key: str) -> None:
    """Refuse a layer PEQA cannot read (bits, host, unloaded or float tensors, shapes, activation order)."""
    what = f"layer '{key}' is a {type(module).__name__}"
    try:
        validate_bits(module.bits)
    except ValueError as err:
        raise ValueError(f"{what}; {err}") from None
    if sys.byteorder != "little":
        raise ValueError(f"{what}; reading GPTQ words needs a little-endian host")
    out_features, in_features = _shape(module)
    tensors = (module.qweight, module.qzeros, module.scales)
    if any(t.device.type == "meta" for t in tensors):
        raise ValueError(f"{what} whose tensors are not loaded (meta device)")
    if module.qweight.dtype.is_floating_point or module.qzeros.dtype.is_floating_point:
        raise ValueError(f"{what} with float qweight/qzeros; expected packed integer words (GPTQ format)")
    n_groups = module.scales.shape[0]
    if in_features % n_groups or module.scales.shape != (n_groups, out_features):
        raise ValueError(f"{what} with scales of shape {tuple(module.scales.shape)} for {in_features} inputs")
    if (in_features * module.bits) % 8 or (out_features * module.bits) % 8:
        raise ValueError(f"{what}: {in_features}x{out_features} codes of {module.bits} bits do not fill whole bytes")
    _check_tensors(module, key, in_features, out_features, n_groups)
    g_idx = getattr(module, "g_idx", None)
    if g_idx is not None:
        trivial = torch.arange(in_features, device=g_idx.device) // (in_features // n_groups)
        if not torch.equal(g_idx.long(), trivial):
            raise ValueError(
                f"{what} quantized with activation order (desc_act=True: g_idx is not column // group_size); PEQA "
                "needs contiguous groups. Re-quantize with desc_act=False (or llm-compressor's actorder='weight')."
            )


def _check_tensors(module: nn.Module, key: str, in_features: int, out_features: int, n_groups: int) -> None:
    """The checks saved adapters get (``peqa_peft.integrations.validation``): finite positive ``scales``, and
    ``qweight``/``qzeros`` of exactly the shape their bit streams need (the codes and zero-points they decode to
    are inside the grid by construction, so the shapes are what can be wrong)."""
    where = f"layer '{key}'"
    validation.check_scales(module.scales, where, "scales")
    for name, lines, per_line in (("qweight", in_features, out_features), ("qzeros", out_features, n_groups)):
        words = getattr(module, name)
        word_bits = words.element_size() * 8
        if (lines * module.bits) % word_bits:
            raise ValueError(
                f"{where}: {lines} {module.bits}-bit values do not fill whole {word_bits}-bit '{name}' words"
            )
        shape = (
            (lines * module.bits // word_bits, per_line)
            if name == "qweight"
            else (per_line, lines * module.bits // word_bits)
        )
        validation.check_shape(words, shape, where, name, f"{module.bits}-bit values in {word_bits}-bit words")


def _stream_bytes(words: torch.Tensor) -> torch.Tensor:
    """The little-endian bytes of ``words`` (row-major), i.e. their bit stream, as a flat ``uint8`` tensor."""
    return words.contiguous().view(torch.uint8).reshape(-1)


@torch.no_grad()
def to_quant_linear(module: nn.Module, key: str) -> QuantLinear:
    """The layer's codes, scales and zero-points as a ``QuantLinear`` (nothing re-quantized)."""
    bits = module.bits
    out_features, in_features = _shape(module)
    n_groups = module.scales.shape[0]
    maxq = 2**bits - 1
    zeros = unpack_bits(_stream_bytes(module.qzeros), bits, n_groups * out_features).view(n_groups, out_features)
    zeros = zeros.t().to(torch.int16)
    if not _is_v2(module):
        zeros = (zeros + 1) & maxq  # v1 stores zero - 1 (with wrap-around for a zero of 0)
    scale = module.scales.t().float()
    packed = _stream_bytes(module.qweight.t())
    codes = unpack_bits(packed, bits, out_features * in_features).view(out_features, in_features)
    return quant_linear_from_codes(codes, scale, zeros, bits, group_size(module), _bias(module), key)


def _bias(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


__all__ = ["check_layer", "describe", "group_size", "is_gptq_layer", "to_quant_linear"]
