"""Optimizers for integer (QFT) weights."""

from .blockwise import dequantize_blockwise, quantize_blockwise
from .int_lion import IntLion

__all__ = ["IntLion", "dequantize_blockwise", "quantize_blockwise"]
