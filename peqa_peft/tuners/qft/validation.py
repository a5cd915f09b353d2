"""Checks of a saved QFT adapter against the model it is about to be loaded into, before anything changes.

A QFT checkpoint holds integer codes, per-row scale/zero-point and float outliers for each tuned weight. Garbage in
any of them (an outlier index past the end of the weight, a NaN scale) would load "successfully" and give a broken
model, so every field is checked first; PEFT would also quantize the passed-in model before reading the file.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ...core.qft.weight import WEIGHT_FIELDS
from ...core.shapes import linear_shape
from ...integrations import validation

_PARAM = "qft_weight"


def _split(key: str) -> Optional[tuple[str, str]]:
    """``(module path, field)`` of ``base_model.model.<path>.qft_weight.<field>``, else ``None``."""
    head, _, field = key.rpartition(".")
    path, _, param = head.rpartition(".")
    if param != _PARAM or field not in WEIGHT_FIELDS:
        return None
    return path.removeprefix("base_model.model."), field


def _weight_shape(module: nn.Module) -> Optional[tuple[int, int]]:
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    shape = linear_shape(base)
    if shape is not None:
        return shape
    if isinstance(base, nn.Embedding):
        return base.num_embeddings, base.embedding_dim
    return None


def _check_fields(fields: dict[str, torch.Tensor], shape: tuple[int, int], where: str) -> None:
    codes, idx = fields["codes"], fields["outlier_idx"]
    validation.check_dtype(codes, "uint8", where, "codes")
    validation.check_shape(codes, shape, where, "codes")
    validation.check_scales(fields["scale"], where, "scale")
    for name in ("zero_point", "outlier_val"):
        validation.check_dtype(fields[name], "float", where, name)
        validation.check_finite(fields[name], where, name)
    if idx.is_floating_point() or idx.shape != fields["outlier_val"].shape:
        raise ValueError(f"{where}: 'outlier_idx' must be integers, one per outlier value")
    if idx.numel() and (idx.min() < 0 or idx.max() >= shape[0] * shape[1] or (idx[1:] <= idx[:-1]).any()):
        raise ValueError(f"{where}: 'outlier_idx' must hold distinct sorted indices into the {shape} weight")


def _check_float_params(floats: dict[str, torch.Tensor], model: nn.Module, source: str) -> None:
    """The float parameters a full-parameter checkpoint holds (norms, biases) must exist in ``model`` and fit."""
    params = dict(model.named_parameters())
    for key, tensor in floats.items():
        path = key.removeprefix("base_model.model.")
        param = params.get(path, params.get(path.replace(".base_layer.", ".")))
        if param is None:
            raise ValueError(f"{source}: '{path}' is neither a QFT weight nor a parameter of this model")
        if not tensor.is_floating_point() or tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(
                f"{source}: '{path}' must be a float tensor of shape {tuple(param.shape)}, got {tensor.dtype} "
                f"{tuple(tensor.shape)}"
            )
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{source}: '{path}' holds non-finite values")


def check_qft_weights(weights: dict[str, torch.Tensor], model: nn.Module, source: str) -> None:
    """Raise a ``ValueError`` unless every saved QFT weight is complete, in range and fits its layer in ``model``,
    and every saved float parameter (a full-parameter checkpoint's norms and biases) fits its parameter."""
    per_layer: dict[str, dict[str, torch.Tensor]] = {}
    floats: dict[str, torch.Tensor] = {}
    for key, tensor in weights.items():
        parsed = _split(key)
        if parsed:
            per_layer.setdefault(parsed[0], {})[parsed[1]] = tensor
        else:
            floats[key] = tensor
    _check_float_params(floats, model, source)
    if not per_layer:
        raise ValueError(f"{source}: the file holds no QFT weights ('*.qft_weight.*' tensors)")
    modules = dict(model.named_modules())
    for path, fields in per_layer.items():
        where = f"{source}: layer '{path}'"
        missing = [f for f in WEIGHT_FIELDS if f not in fields]
        if missing:
            raise ValueError(f"{where} lacks the QFT field(s) {missing}")
        shape = _weight_shape(modules[path]) if path in modules else None
        if shape is None:
            raise ValueError(f"{where} is not a linear or embedding layer of this model")
        _check_fields(fields, shape, where)
