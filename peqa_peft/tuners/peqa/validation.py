"""Checks of a saved PEQA adapter against the model it is about to be loaded into.

Everything here only reads: it runs before PEFT creates or replaces any module, so a refused adapter leaves the
model exactly as it was (``PeftModel.from_pretrained`` would otherwise quantize the base in place first and fail
afterwards, and ``load_adapter`` onto an existing adapter name would skip the base fingerprint altogether).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ...core import QuantLinear, num_groups
from ...core.shapes import linear_shape
from ...integrations import validation

PEQA_PARAM_NAMES = ("peqa_scale", "peqa_zero_point")


def split_key(key: str) -> Optional[tuple[str, str]]:
    """``(module path, parameter name)`` of a saved PEQA tensor key, or ``None`` for any other key.

    PEFT saves ``base_model.model.<module path>.peqa_scale`` (the adapter name is stripped).
    """
    prefix, _, name = key.rpartition(".")
    if name not in PEQA_PARAM_NAMES:
        return None
    return prefix.removeprefix("base_model.model."), name


def expected_delta_shape(module: nn.Module, group_size: Optional[int]) -> Optional[tuple[int, int]]:
    """The ``(out_features, n_groups)`` shape PEQA's deltas have on ``module``, or ``None`` if it is no target."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if isinstance(base, QuantLinear):
        return tuple(base.scale.shape)
    shape = linear_shape(base)
    if shape is None:
        return None
    out_features, in_features = shape
    return out_features, num_groups(in_features, group_size)


def check_adapter_weights(weights: dict[str, torch.Tensor], config: Any, model: nn.Module, source: str) -> None:
    """Raise a ``ValueError`` unless ``weights`` (a saved PEQA adapter) fit ``model`` (the transformers model).

    Checked: every tensor is a finite floating point tensor of the shape its layer needs; every layer named by a
    tensor exists in ``model`` and is a linear layer; every layer recorded in the adapter's base fingerprint has its
    scale delta in the file (a missing one would silently keep an untrained layer).
    """
    modules = dict(model.named_modules())
    present = set()
    for key, tensor in weights.items():
        parsed = split_key(key)
        if parsed is None:
            continue  # modules_to_save and other non-PEQA tensors are PEFT's to check
        path, name = parsed
        # deltas may be negative or zero (they are added to s0), so only dtype and finiteness are checked
        validation.check_dtype(tensor, "float", source, key)
        validation.check_finite(tensor, source, key)
        if path not in modules:
            raise ValueError(f"{source}: tensor '{key}' names layer '{path}', which this model does not have")
        shape = expected_delta_shape(modules[path], config.group_size)
        if shape is None:
            raise ValueError(f"{source}: layer '{path}' is a {type(modules[path]).__name__}, not a linear layer")
        why = f"layer '{path}' with bits={config.bits}, group_size={config.group_size}: the adapter does not fit"
        validation.check_shape(tensor, shape, source, key, why)
        if name == "peqa_scale":
            present.add(path)
    recorded = (config.base_fingerprint or {}).get("layers", {})
    missing = sorted(set(recorded) - present)
    if missing:
        raise ValueError(
            f"{source}: the adapter was trained on {len(recorded)} layers but has no scale delta for "
            f"{len(missing)} of them (first: '{missing[0]}'); the file is incomplete"
        )
    if not present:
        raise ValueError(f"{source}: the file holds no PEQA scale deltas ('*.peqa_scale' tensors)")


def check_peft_type(weights: dict[str, torch.Tensor], peft_type: str, source: str) -> None:
    """Refuse PEQA deltas under another method's ``peft_type`` (an edited or mixed-up ``adapter_config.json``)."""
    name = getattr(peft_type, "value", peft_type)  # a PeftType member or its string
    if name != "PEQA" and any(split_key(k) for k in weights):
        raise ValueError(f"{source}: the weights are PEQA scale deltas but adapter_config.json says peft_type={name}")


def fingerprint_problem(layers: dict[str, nn.Module], config: Any) -> Optional[str]:
    """Why ``layers`` (name -> quantized layer) are not the base ``config.base_fingerprint`` was recorded on."""
    expected = config.base_fingerprint
    if not expected:
        return None
    if (expected.get("bits"), expected.get("group_size")) != (config.bits, config.group_size):
        return (
            f"adapter config is inconsistent: it was trained with bits={expected.get('bits')}, group_size="
            f"{expected.get('group_size')} but asks for bits={config.bits}, group_size={config.group_size}"
        )
    recorded = expected.get("layers", {})
    for key, module in layers.items():
        if key in recorded and recorded[key] != layer_fingerprint(module):
            return (
                f"This PEQA adapter was trained on a different quantized base: the quantization grid of layer "
                f"'{key}' (bits={config.bits}, group_size={config.group_size}) does not match the one recorded in "
                "the adapter. Load it onto the base model it was trained with (adapter_config.json "
                "'base_model_name_or_path'), quantized with the same settings."
            )
    return None


def layer_fingerprint(module: nn.Module) -> str:
    """Fingerprint of a ``QuantLinear`` or of a PEQA layer's base as it was before merges."""
    return module.fingerprint() if isinstance(module, QuantLinear) else module.base_fingerprint()


def verify_fingerprint(layers: dict[str, nn.Module], config: Any) -> None:
    """Raise a ``ValueError`` when :func:`fingerprint_problem` finds one."""
    problem = fingerprint_problem(layers, config)
    if problem:
        raise ValueError(problem)
