"""Build a ``QuantLinear`` from integer codes, scales and zero-points read from a checkpoint (no float weight).

Shared by the readers of quantized formats (``compressed_tensors/reader.py``, ``gptq/reader.py``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ...core import QuantLinear, pack_bits
from ..validation import check_quantized_layer


@torch.no_grad()
def quant_linear_from_codes(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    group_size: Optional[int],
    bias: Optional[torch.Tensor],
    key: str,
) -> QuantLinear:
    """A ``QuantLinear`` with ``W = scale * (codes - zero_point)``.

    ``codes``: unsigned integers in ``[0, 2^bits)`` of shape ``(out_features, in_features)``; ``scale`` and
    ``zero_point``: ``(out_features, n_groups)`` with ``zero_point`` integral in ``[0, 2^bits)``. The codes are packed
    right away; only this one layer's unpacked codes (1 byte per weight) exist meanwhile.
    """
    out_features, in_features = codes.shape
    zero_point = zero_point.reshape(scale.shape) if zero_point.numel() == scale.numel() else zero_point
    # The same checks a saved adapter gets (a last line of defence: the backends' ``check`` ran them on the stored
    # tensors already, for every layer before any was converted).
    check_quantized_layer(f"layer '{key}'", bits, out_features, in_features, group_size, scale, zero_point, codes)
    layer = QuantLinear(
        in_features, out_features, bits, group_size, bias=bias is not None, device=torch.device("meta")
    )
    layer.qweight = pack_bits(codes, bits)
    layer.scale = scale.detach().to(torch.float32).contiguous()
    layer.zero_point = zero_point.detach().to(torch.uint8).contiguous()
    layer.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
    return layer


def expand_per_tensor(scale: torch.Tensor, out_features: int) -> torch.Tensor:
    """A per-tensor scale ``()``/``(1,)``/``(1, 1)`` as one identical scale per output channel ``(out, 1)``."""
    return scale.reshape(1, 1).expand(out_features, 1).clone()


__all__ = ["expand_per_tensor", "quant_linear_from_codes"]
