"""Memory accounting from live tensors (bytes, never estimates)."""

from __future__ import annotations

from torch import nn

from .memory import model_state_bytes, tensor_bytes

__all__ = ["model_state_bytes", "module_resident_bytes", "quantized_layer_bytes", "tensor_bytes"]


def module_resident_bytes(module: nn.Module) -> int:
    """Bytes of all distinct parameters and buffers of ``module`` (shared storage counted once; packed and integer
    tensor subclasses counted by the tensors that really store them)."""
    return model_state_bytes(module)["weights"]


def quantized_layer_bytes(model: nn.Module) -> dict[str, dict[str, int]]:
    """Per quantized layer: bytes of packed codes, scales + zero-points, bias, adapters, and the logical weight size.

    Keys of the inner dicts: ``codes``, ``qparams``, ``bias``, ``adapter`` (PEQA deltas on the wrapping layer, 0 for
    a bare ``QuantLinear``), ``total`` (all resident tensors of the layer) and ``numel`` (``out * in``).
    """
    from . import QuantLinear

    report = {}
    wrappers = {id(m.get_base_layer()): m for m in model.modules() if hasattr(m, "peqa_scale")}
    for name, module in model.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        entry = module.memory_bytes()
        wrapper = wrappers.get(id(module))
        entry["adapter"] = 0 if wrapper is None else module_resident_bytes(wrapper) - module_resident_bytes(module)
        entry["total"] = module_resident_bytes(module if wrapper is None else wrapper)
        entry["numel"] = module.in_features * module.out_features
        report[name.removesuffix(".base_layer")] = entry
    return report
