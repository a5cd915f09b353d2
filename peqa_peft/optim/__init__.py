"""Optimizers for integer (QFT) weights."""

from .blockwise import dequantize_blockwise, quantize_blockwise
from .int_lion import IntLion, NonFiniteGradientError

__all__ = ["IntLion", "NonFiniteGradientError", "dequantize_blockwise", "quantize_blockwise"]
