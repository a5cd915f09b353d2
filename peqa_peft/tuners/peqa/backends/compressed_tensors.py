"""compressed-tensors layers as PEQA base layers: the reader
(:mod:`peqa_peft.integrations.formats.compressed_tensors.reader`, which also holds ``install_compat_fixes``) plus the
check of the layer's grid against the ``PeqaConfig`` (as PEFT's ``dispatch_*`` functions wrap a backend's layer)."""

from __future__ import annotations

from torch import nn

from ....core import QuantLinear
from ....integrations.formats.compressed_tensors import reader
from ....integrations.formats.compressed_tensors.reader import (  # noqa: F401  (former names of this module)
    _pack_meta_zero_points,
    check_tensors,
    describe,
    install_compat_fixes,
)
from ..config import PeqaConfig

NAME = "compressed_tensors"


def matches(module: nn.Module) -> bool:
    return reader.is_compressed_layer(module)


def check(module: nn.Module, config: PeqaConfig, key: str) -> None:
    """Refuse schemes PEQA cannot represent, and a PeqaConfig that contradicts the checkpoint's grid."""
    from . import check_adopted_grid

    reader.check_scheme(module, key)
    check_adopted_grid(*reader.grid(module), config, key, f"compressed-tensors {reader.describe(module)}")
    reader.check_tensors(module, key)


def to_quant_linear(module: nn.Module, config: PeqaConfig, key: str) -> QuantLinear:
    return reader.to_quant_linear(module, key)
