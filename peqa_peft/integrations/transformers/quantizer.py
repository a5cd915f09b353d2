"""Quantize while loading: ``from_pretrained(..., quantization_config=PeqaQuantizationConfig(bits=4))``.

A transformers ``HfQuantizer`` (registered as quant method ``"peqa"`` when ``peqa_peft`` is imported), built like
bitsandbytes' 4-bit one: before the checkpoint is read, every targeted ``nn.Linear`` / ``Conv1D`` of the (meta-device)
model skeleton becomes a :class:`~peqa_peft.core.QuantLinear` that temporarily keeps a meta ``weight`` placeholder, so
the loader collects the checkpoint's float weight for it. Each such weight then goes through
:class:`PeqaQuantize`, which turns it into packed codes, ``s0`` and ``z0`` and drops the placeholder: one layer's float
weight exists at a time, never the full-precision model.

``get_peft_model(model, PeqaConfig(bits=..., group_size=...))`` adopts these layers as they are (a config whose bits
or group size differ is refused). ``model.save_pretrained`` writes the packed model with its ``quantization_config``;
``from_pretrained`` of that directory rebuilds the ``QuantLinear`` skeleton and loads codes, scales and zero-points
directly (``pre_quantized``), without any float weight at all.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
from typing import Any, Optional

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.pytorch_utils import Conv1D
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.quantizers_utils import get_module_from_name
from transformers.utils.quantization_config import QuantizationConfigMixin

from ...core.linear import QuantLinear
from ...core.packing import pack_bits
from ...core.quantizer import (
    AUTO,
    quantize_weight,
    resolve_auto_group_size,
    resolve_auto_init_method,
    validate_group_size,
    validate_quant_settings,
)
from ...core.shapes import linear_shape

QUANT_METHOD = "peqa"
_PLACEHOLDER = "weight"


def _load_malloc_trim():
    """glibc's ``malloc_trim`` (``None`` elsewhere): hands freed heap memory back to the operating system."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


class PeqaQuantizationConfig(QuantizationConfigMixin):
    """How ``from_pretrained`` quantizes linear layers to PEQA's packed format while it reads the checkpoint.

    Args:
        bits: weight bit width, 2..8.
        group_size: ``"auto"`` (default: group 32 when 32 divides every targeted layer's ``in_features``, else per
            output channel; see ``PeqaConfig``; resolved to the concrete value when the model is built), ``None``
            for one scale per output channel, else input columns per scale (must divide every targeted layer's
            ``in_features``).
        init_method: ``"auto"`` (default: ``"mse"`` with groups, ``"minmax"`` per channel; resolved with the group
            size), ``"mse"`` (grid search minimising ``||W - W_hat||_F^2``) or ``"minmax"`` (round-to-nearest).
        search_grid / max_shrink: the MSE search's resolution and largest clipped fraction (as in PeqaConfig).
        target_modules: ``None`` for every linear layer except the output embeddings (``lm_head``), or a list of
            module-name suffixes / a regex (full match) selecting the layers to quantize.
        exclude_modules: module-name suffixes (or a regex) to keep in floating point.
    """

    def __init__(
        self,
        bits: int = 4,
        group_size: Optional[int | str] = "auto",
        init_method: str = AUTO,
        search_grid: int = 100,
        max_shrink: float = 0.8,
        target_modules: Optional[list[str] | str] = None,
        exclude_modules: Optional[list[str] | str] = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.bits = bits
        self.group_size = group_size
        self.init_method = init_method
        self.search_grid = search_grid
        self.max_shrink = max_shrink
        self.target_modules = target_modules
        self.exclude_modules = exclude_modules
        self.post_init()

    def post_init(self) -> None:
        validate_quant_settings(self.bits, self.group_size, self.init_method, self.search_grid, self.max_shrink)

    def selects(self, name: str) -> bool:
        """Whether the module called ``name`` is to be quantized (given that it is a linear layer)."""
        return _matches(name, self.target_modules) and not _matches(name, self.exclude_modules, default=False)


def _matches(name: str, patterns: Optional[list[str] | str], default: bool = True) -> bool:
    if patterns is None:
        return default
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


class PeqaQuantize(ConversionOps):
    """Loader operation: one checkpoint float weight in, the packed codes + ``s0`` + ``z0`` of its layer out."""

    def __init__(self, hf_quantizer: PeqaHfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    @torch.no_grad()
    def convert(
        self, input_dict: dict[str, Any], model: nn.Module = None, missing_keys: Optional[set] = None, **kwargs
    ) -> dict[str, torch.Tensor]:
        config = self.hf_quantizer.quantization_config
        result = {}
        for param_name, value in input_dict.items():
            weight = value[0] if isinstance(value, list) else value
            # a private fp32 copy of this one layer: the search reads it once per candidate, and the loader may hand
            # out a view into the memory-mapped checkpoint file
            weight = weight.to(torch.float32, copy=True)
            module, _ = get_module_from_name(model, param_name)
            prefix = param_name[: -len(_PLACEHOLDER)]
            if module.source_is_conv1d:
                weight = weight.t()  # Conv1D stores (in_features, out_features)
            codes, scale, zero = quantize_weight(
                weight,
                config.bits,
                config.group_size,
                config.init_method,
                grid=config.search_grid,
                max_shrink=config.max_shrink,
            )
            del weight
            result[prefix + "qweight"] = pack_bits(codes, config.bits)
            result[prefix + "scale"] = scale
            result[prefix + "zero_point"] = zero.to(torch.uint8)
            # the float placeholder has served its purpose: the layer is a plain QuantLinear from now on
            del module._parameters[_PLACEHOLDER]
            if missing_keys is not None:
                missing_keys.discard(param_name)
        # Each layer's float copy and search temporaries are freed here, but glibc keeps freed blocks of its heap
        # mapped; over hundreds of layers that retained memory grew to about the size of the packed model (measured
        # on a 1.1B Llama: 3.0 GB vs 0.5 GB anonymous RSS). Trimming after every layer keeps the loader's footprint
        # at the packed model plus one layer's temporaries.
        if _MALLOC_TRIM is not None:
            _MALLOC_TRIM(0)
        return result


def _replace_linears(model: nn.Module, config: PeqaQuantizationConfig, with_placeholder: bool) -> list[str]:
    """Swap the selected linear layers of a meta-device skeleton for ``QuantLinear``s; return their names."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    selected = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and module is not head and config.selects(name)
    ]
    if config.group_size == AUTO:  # one concrete value, saved with the model's quantization_config
        config.group_size = resolve_auto_group_size([linear_shape(m)[1] for _, m in selected])
    if config.init_method == AUTO:
        config.init_method = resolve_auto_init_method(config.group_size)
    replaced = []
    for name, module in selected:
        out_features, in_features = linear_shape(module)
        validate_group_size(config.group_size, in_features, name)
        layer = QuantLinear(
            in_features, out_features, config.bits, config.group_size, bias=module.bias is not None, device="meta"
        )
        if module.bias is not None:
            layer.bias = nn.Parameter(torch.empty_like(module.bias, device="meta"), requires_grad=False)
        layer.source_is_conv1d = isinstance(module, Conv1D)
        layer.source_dtype = module.weight.dtype  # the dtype PEFT creates this layer's adapter weights in
        if with_placeholder:
            layer.register_parameter(
                _PLACEHOLDER, nn.Parameter(torch.empty_like(module.weight, device="meta"), requires_grad=False)
            )
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
        # transformers runs each model's `_init_weights` over every module after loading; some (GPT-2's attention
        # and MLP) reach into `child.weight`, which a QuantLinear does not have. The checkpoint initializes these
        # layers, so flag them -- and parents that own no parameter themselves -- as initialized.
        layer._is_hf_initialized = True
        if parent is not model and next(parent.parameters(recurse=False), None) is None:
            parent._is_hf_initialized = True
        replaced.append(name)
    if not replaced:
        raise ValueError("PeqaQuantizationConfig selects no linear layer of this model; check `target_modules`")
    return replaced


class PeqaHfQuantizer(HfQuantizer):
    """The transformers quantizer behind :class:`PeqaQuantizationConfig` (see the module docstring)."""

    requires_calibration = False
    quantization_config: PeqaQuantizationConfig

    @property
    def quantized_element_size(self) -> float:
        return self.quantization_config.bits / 8

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs) -> bool:
        module, name = get_module_from_name(model, param_name)
        return isinstance(module, QuantLinear) and name == _PLACEHOLDER and _PLACEHOLDER in module._parameters

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs) -> None:
        self.replaced = _replace_linears(model, self.quantization_config, with_placeholder=not self.pre_quantized)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs) -> nn.Module:
        leftover = [
            n for n, m in model.named_modules() if isinstance(m, QuantLinear) and _PLACEHOLDER in m._parameters
        ]
        if leftover:
            raise ValueError(f"the checkpoint has no weight for the PEQA-quantized layer(s) {leftover[:3]}")
        return model

    def get_quantize_ops(self) -> PeqaQuantize:
        return PeqaQuantize(self)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def register() -> None:
    """Register the config and quantizer with transformers under ``"peqa"`` (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(PeqaQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(PeqaHfQuantizer)


__all__ = ["PeqaHfQuantizer", "PeqaQuantizationConfig", "PeqaQuantize", "register"]
