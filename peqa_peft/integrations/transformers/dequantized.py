"""Layers of a compressed-tensors checkpoint that transformers loaded *dequantized*, with their stored grid attached.

A compressed-tensors checkpoint loads dense when its ``quantization_config`` says ``"dequantize": true`` (PEQA's own
exports do, so that plain transformers reads them) or with ``CompressedTensorsConfig(dequantize=True)``: transformers
decompresses every layer to ``W = s * (q - zp)`` in the model's dtype and drops the quantization config, so the model
looks like a float model. PEQA re-quantizing those weights with its own grid would add a second rounding to a model
whose exact grid sits in the files it was loaded from.

:func:`dequantized_views` finds, for each float target layer, the checkpoint's scheme (its ``config.json``) and the
stored ``weight_scale`` / ``weight_zero_point`` (only those tensors are read, memory-mapped), and returns a *view* of
the layer -- a module sharing its weight and bias that carries them -- which the compressed-tensors reader adopts
through its decompressed-layer path: ``q = round(W / s) + zp``, checked to reproduce the loaded weight, so a weight
changed after loading is refused, never adopted onto a grid it is not on. The model itself is not modified.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..formats.compressed_tensors.reader import _RECORD, _value, check_scheme
from .stored_weights import checkpoint_files, checkpoint_module_names, tensor_index

GRID_TENSORS = ("weight_scale", "weight_zero_point")
QUANT_METHOD = "compressed-tensors"


def _checkpoint(model: nn.Module) -> tuple[list[Path], Optional[dict]]:
    """The safetensors files ``model`` was loaded from and their ``config.json``'s compressed-tensors config."""
    files = checkpoint_files(model)
    if not files or not (files[0].parent / "config.json").is_file():
        return files, None
    qconfig = json.loads((files[0].parent / "config.json").read_text()).get("quantization_config")
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != QUANT_METHOD:
        return files, None
    return files, qconfig


def _schemes(model: nn.Module, qconfig: dict, keys) -> dict:
    """Module name -> its compressed-tensors ``QuantizationScheme`` (the config groups' targets minus ``ignore``)."""
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import match_named_modules

    parsed = QuantizationConfig.model_validate(qconfig)
    schemes = {}
    for scheme in parsed.config_groups.values():
        for name, _ in match_named_modules(model, scheme.targets, parsed.ignore):
            if name in keys:
                schemes.setdefault(name, scheme)
    return schemes


def _stored_name(model: nn.Module, key: str, index: dict) -> Optional[str]:
    """The checkpoint's module name for ``key`` whose ``weight_scale`` the files hold, if any."""
    return next((n for n in checkpoint_module_names(model, key) if f"{n}.weight_scale" in index), None)


def _view(module: nn.Module, scheme, tensors: dict[str, torch.Tensor], record) -> nn.Module:
    """A linear module sharing ``module``'s weight and bias, carrying the scheme and the stored grid tensors."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    view = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
    view.weight, view.bias = module.weight, module.bias
    view.quantization_scheme = scheme
    scale = tensors["weight_scale"].to(module.weight.device)
    view.weight_scale = scale
    zp = tensors.get("weight_zero_point")
    if zp is not None:
        packed = _value(scheme.weights.strategy) in ("channel", "group") and zp.dtype == torch.int32
        if packed and zp.shape[0] != module.out_features:  # compressed-tensors packs these along the outputs
            zp = unpack_from_int32(zp, scheme.weights.num_bits, torch.Size(scale.shape), packed_dim=0)
        view.weight_zero_point = zp.to(module.weight.device)
    setattr(view, _RECORD, record)  # which tensors the file stores: the reader checks them against the scheme
    return view


@torch.no_grad()
def dequantized_views(model: nn.Module, targets: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Views of the float ``targets`` whose checkpoint stores them as compressed-tensors integers (see the module
    docstring); empty for any other model. Keys are the target names, values modules the reader adopts."""
    from safetensors import safe_open

    floats = {
        k: m
        for k, m in targets.items()
        if type(m) is nn.Linear and not hasattr(m, "quantization_scheme") and m.weight.is_floating_point()
    }
    if not floats or any(m.weight.is_meta for m in floats.values()):
        return {}
    files, qconfig = _checkpoint(model)
    if qconfig is None:
        return {}
    try:
        schemes = _schemes(model, qconfig, floats)
    except (ValueError, TypeError) as err:  # a config this compressed-tensors version cannot parse
        warnings.warn(
            "PEQA: the model was loaded from a compressed-tensors checkpoint whose quantization_config cannot be "
            f"read ({type(err).__name__}: {str(err).splitlines()[0]}); its dense weights are re-quantized.",
            stacklevel=5,
        )
        return {}
    index = tensor_index(files)
    views = {}
    for key, scheme in schemes.items():
        stored = _stored_name(model, key, index)
        if stored is None or scheme.weights is None:
            continue
        names = [n for n in GRID_TENSORS if f"{stored}.{n}" in index]
        tensors = {}
        for name in names:
            with safe_open(str(index[f"{stored}.{name}"]), framework="pt") as handle:
                tensors[name] = handle.get_tensor(f"{stored}.{name}")
        record = (str(index[f"{stored}.weight_scale"]), frozenset(names))
        view = _view(floats[key], scheme, tensors, record)
        try:
            check_scheme(view, key)
        except ValueError as err:  # e.g. fp8: not a grid PEQA can tune, so the dense weight is quantized as before
            warnings.warn(f"PEQA: {err}; its dense (dequantized) weight is re-quantized instead.", stacklevel=5)
            continue
        views[key] = view
    return views


__all__ = ["dequantized_views"]
