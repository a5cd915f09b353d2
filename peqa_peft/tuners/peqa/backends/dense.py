"""Float ``nn.Linear`` / transformers ``Conv1D``: quantized once with PEQA's initializer (the paper's setting)."""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from ....core import QuantLinear, validate_group_size
from ....core.shapes import linear_shape
from ..config import PeqaConfig

NAME = "dense"


def matches(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D)) and getattr(module, "weight", None) is not None


def in_features_of(module: nn.Module) -> int:
    return linear_shape(module)[1]


def check(module: nn.Module, config: PeqaConfig, key: str) -> None:
    validate_group_size(config.group_size, in_features_of(module), key)


def to_quant_linear(module: nn.Module, config: PeqaConfig, key: str, weight=None) -> QuantLinear:
    """Quantize ``module.weight``, or ``weight`` (the same values at a higher precision, as stored) if given."""
    return QuantLinear.from_linear(
        module, config.bits, config.group_size, config.init_method, config.search_grid, config.max_shrink, weight
    )
