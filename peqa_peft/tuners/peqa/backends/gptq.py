"""GPTQ-format layers as PEQA base layers: the reader (:mod:`peqa_peft.integrations.formats.gptq.reader`) plus the
check of the layer's grid against the ``PeqaConfig`` (as PEFT's ``dispatch_*`` functions wrap a backend's layer)."""

from __future__ import annotations

from torch import nn

from ....core import QuantLinear
from ....integrations.formats.gptq import reader
from ....integrations.formats.gptq.reader import describe, group_size  # noqa: F401  (former names of this module)
from ..config import PeqaConfig

NAME = "gptq"


def matches(module: nn.Module) -> bool:
    return reader.is_gptq_layer(module)


def check(module: nn.Module, config: PeqaConfig, key: str) -> None:
    from . import check_adopted_grid

    reader.check_layer(module, key)
    check_adopted_grid(module.bits, reader.group_size(module), config, key, reader.describe(module))


def to_quant_linear(module: nn.Module, config: PeqaConfig, key: str) -> QuantLinear:
    return reader.to_quant_linear(module, key)
