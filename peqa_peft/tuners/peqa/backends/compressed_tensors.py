"""compressed-tensors layers as PEQA base layers: the reader
(:mod:`peqa_peft.integrations.formats.compressed_tensors.reader`, which also holds ``install_compat_fixes``) plus the
check of the layer's grid against the ``PeqaConfig`` (as PEFT's ``dispatch_*`` functions wrap a backend's layer)."""

from __future__ import annotations

import warnings

from torch import nn

from ....core import QuantLinear
from ....core.quantizer import AUTO
from ....integrations.formats.compressed_tensors import reader
from ....integrations.formats.compressed_tensors.reader import (  # noqa: F401  (former names of this module)
    _pack_meta_zero_points,
    check_tensors,
    describe,
    install_compat_fixes,
)
from ....integrations.transformers.dequantized import dequantized_views
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


def dequantized_targets(model: nn.Module, targets: dict[str, nn.Module], config: PeqaConfig) -> dict[str, nn.Module]:
    """Float targets that transformers decompressed from a compressed-tensors checkpoint (``"dequantize": true``, as
    PEQA's own exports say), as views this backend adopts in the checkpoint's codes
    (:mod:`peqa_peft.integrations.transformers.dequantized`) -- when ``config`` asks for the checkpoint's grid
    (same bits; ``group_size`` "auto" or the same; or ``adopt_checkpoint_grid``). A config asking for another grid
    re-quantizes the dense weights, with a warning that says so."""
    views = dequantized_views(model, targets)
    if not views:
        return {}
    grids = {reader.grid(view) for view in views.values()}
    if config.adopt_checkpoint_grid or all(
        bits == config.bits and config.group_size in (AUTO, group) for bits, group in grids
    ):
        return views
    found = ", ".join(f"bits={b}, group_size={g}" for b, g in sorted(grids, key=str))
    warnings.warn(
        f"PEQA: {len(views)} target layer(s) were loaded dequantized from a compressed-tensors checkpoint ({found}); "
        f"the PeqaConfig asks for bits={config.bits}, group_size={config.group_size}, so their dense weights are "
        "re-quantized (a second rounding). Pass the checkpoint's grid to tune its own codes instead.",
        stacklevel=4,
    )
    return {}
