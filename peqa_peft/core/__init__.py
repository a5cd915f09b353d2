"""Shared quantization core: quantizers, bit packing, fused packed-weight ops and the ``QuantLinear`` module.

Both methods of the package build on it: PEQA (scale-only adapters over packed low-bit weights) and QFT.
"""

from . import kernels
from .functional import dequantize_packed, packed_linear, unpack_codes
from .linear import QuantLinear
from .packing import pack_bits, packed_numel, unpack_bits
from .quantizer import (
    AUTO_GROUP_SIZE,
    SUPPORTED_BITS,
    compute_qparams,
    dequantize,
    fake_quantize,
    num_groups,
    quantize,
    quantize_weight,
    resolve_auto_group_size,
    resolve_auto_init_method,
    validate_bits,
    validate_group_size,
)

__all__ = [
    "AUTO_GROUP_SIZE",
    "SUPPORTED_BITS",
    "QuantLinear",
    "compute_qparams",
    "dequantize",
    "dequantize_packed",
    "kernels",
    "fake_quantize",
    "num_groups",
    "pack_bits",
    "packed_linear",
    "packed_numel",
    "quantize",
    "quantize_weight",
    "resolve_auto_group_size",
    "resolve_auto_init_method",
    "unpack_bits",
    "unpack_codes",
    "validate_bits",
    "validate_group_size",
]
