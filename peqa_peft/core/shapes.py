"""The ``(out_features, in_features)`` shape of a linear layer, whichever way its weight is stored."""

from __future__ import annotations

from typing import Optional

from torch import nn

from .linear import is_transposed_linear


def linear_shape(module: nn.Module) -> Optional[tuple[int, int]]:
    """``(out_features, in_features)`` of an ``nn.Linear`` or a registered transposed linear (transformers'
    ``Conv1D``, whose weight is ``(in, out)``), read from the weight's shape; ``None`` for any other module."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if is_transposed_linear(module):
        in_features, out_features = module.weight.shape
        return out_features, in_features
    return None


__all__ = ["linear_shape"]
