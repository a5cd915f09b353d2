"""QFT's integer tensors, re-exported from their modules (this module's former contents, kept as an import path).

- :mod:`.weight`: ``QftWeight`` (the trainable weight) and its op handlers; :mod:`.fsdp_ops`: FSDP2's ops on it.
- :mod:`.int8_grad`: ``Int8Grad`` (the int8 weight gradient) and ``GradientRows`` (built chunk by chunk).
- :mod:`.grad`: the int8 gradient quantizer (``quantize_grad_rows``).
- :mod:`.dispatch`: the per-class op tables and the refusing dense fallback (``allow_dense_fallback``).
- :mod:`.linear`: the autograd linear (``qft_linear``).
"""

from __future__ import annotations

from .dispatch import allow_dense_fallback
from .grad import GRAD_ROW_FLOOR, quantize_grad_rows
from .int8_grad import GradientRows, Int8Grad
from .linear import qft_linear
from .weight import WEIGHT_BITS, WEIGHT_FIELDS, QftWeight

# The private name this module had; tests and benchmarks outside the package still use it.
_quantize_grad_rows = quantize_grad_rows

__all__ = [
    "GRAD_ROW_FLOOR",
    "WEIGHT_BITS",
    "WEIGHT_FIELDS",
    "GradientRows",
    "Int8Grad",
    "QftWeight",
    "allow_dense_fallback",
    "qft_linear",
    "quantize_grad_rows",
]
