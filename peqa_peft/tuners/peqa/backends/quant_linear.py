"""PEQA's own ``QuantLinear`` as a base layer: reused as it is (its codes, ``s0`` and ``z0`` are the base)."""

from __future__ import annotations

from torch import nn

from ....core import QuantLinear
from ..config import PeqaConfig

NAME = "quant_linear"


def matches(module: nn.Module) -> bool:
    return isinstance(module, QuantLinear)


def check(module: QuantLinear, config: PeqaConfig, key: str) -> None:
    from . import check_adopted_grid

    check_adopted_grid(module.bits, module.group_size, config, key, "QuantLinear")


def to_quant_linear(module: QuantLinear, config: PeqaConfig, key: str) -> QuantLinear:
    return module
