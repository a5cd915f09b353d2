"""Which PEQA base layer each kind of target module becomes: one dispatcher, one module per weight format.

PEFT's LoRA picks a layer class per backend (``_create_new_module`` tries bitsandbytes, GPTQ, torchao, ... in turn);
PEQA always ends up with the same base layer, a packed :class:`~peqa_peft.core.QuantLinear`, so its dispatcher picks
the *reader* instead: how to obtain integer codes, ``s0`` and ``z0`` from the module that is there.

- ``quant_linear``: a ``QuantLinear`` (built by ``PeqaQuantizationConfig`` while loading, or left by ``unload()``):
  reused as it is.
- ``compressed_tensors``: a linear layer loaded from a compressed-tensors checkpoint (llm-compressor's RTN, GPTQ, AWQ
  output): the checkpoint's integers, scales and zero-points are taken over, nothing is re-quantized.
- ``gptq``: a GPTQ-format layer (``qweight``/``qzeros``/``scales``/``g_idx``, as GPTQModel and AutoGPTQ load them).
- ``dense``: ``nn.Linear`` / transformers ``Conv1D`` with a float weight: quantized once (PEQA's initialization).

Every backend module defines ``NAME``, ``matches(module)``, ``check(module, config, key)`` (raises a one-line
``ValueError``/``TypeError`` naming the layer, before anything is replaced) and ``to_quant_linear(module, config,
key)``. The first backend whose ``matches`` is true handles a module, so the specific formats come before ``dense``.
"""

from __future__ import annotations

import warnings
from types import ModuleType

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND
from torch import nn

from ....core import QuantLinear, resolve_auto_group_size, resolve_auto_init_method
from ....core.quantizer import AUTO
from ..config import PeqaConfig
from . import compressed_tensors, dense, gptq, quant_linear

BACKENDS: tuple[ModuleType, ...] = (quant_linear, compressed_tensors, gptq, dense)


def find_backend(module: nn.Module) -> ModuleType | None:
    """The backend that reads ``module``, or ``None`` when PEQA cannot use it as a base layer."""
    return next((backend for backend in BACKENDS if backend.matches(module)), None)


def check_target(module: nn.Module, config: PeqaConfig, key: str) -> ModuleType:
    """Validate one target against ``config`` (no side effects); return its backend."""
    backend = find_backend(module)
    if backend is None:
        raise TypeError(
            f"Target module '{key}' is a {type(module).__name__}; PEQA supports torch.nn.Linear, transformers' "
            "Conv1D, its own QuantLinear, compressed-tensors integer layers and GPTQ-format layers. Adjust "
            "`target_modules` or add it to `exclude_modules`."
        )
    backend.check(module, config, key)
    return backend


def resolve_group_size(config: PeqaConfig, targets: dict[str, nn.Module]) -> None:
    """Replace ``group_size="auto"`` in ``config`` by the concrete value for these targets (before any check).

    Float layers: :func:`~peqa_peft.quant.resolve_auto_group_size` of their ``in_features``. Layers that are already
    quantized (a ``QuantLinear`` base, a compressed-tensors or GPTQ checkpoint) keep their own grid: "auto" adopts it
    (:func:`check_adopted_grid` sets it from the first such layer when no float layer is targeted). The concrete value
    is what the saved adapter records, so it reloads onto the identical grid whatever a later version's rule says.
    """
    if config.group_size != AUTO:
        return
    widths = [dense.in_features_of(m) for m in targets.values() if find_backend(m) is dense]
    existing = {
        base.group_size
        for m in targets.values()
        if isinstance(base := (m.get_base_layer() if isinstance(m, BaseTunerLayer) else m), QuantLinear)
    }
    if len(existing) == 1 and not widths:
        config.group_size = existing.pop()
    elif widths:
        config.group_size = resolve_auto_group_size(widths)


def resolve_init_method(config: PeqaConfig) -> None:
    """Replace ``init_method="auto"`` by the concrete method for the resolved group size (recorded like it)."""
    if config.init_method == AUTO and config.group_size != AUTO:
        config.init_method = resolve_auto_init_method(config.group_size)


def to_quant_linear(module: nn.Module, config: PeqaConfig, key: str, stored=None) -> QuantLinear:
    """The packed base layer for ``module`` (checked first); ``stored``: a float layer's weight as stored (at a
    higher precision than the loaded one), quantized instead of the loaded weight."""
    backend = check_target(module, config, key)
    if stored is not None and backend is not dense:
        raise TypeError(f"layer '{key}': a stored float weight was given for a {backend.NAME} layer")
    layer = backend.to_quant_linear(module, config, key, *(() if stored is None else (stored,)))
    source_bias = getattr(module, "bias", None)
    if layer.bias is not None and layer.bias.is_meta and source_bias is not None and not source_bias.is_meta:
        # PEFT builds new layers under `init_empty_weights` when low_cpu_mem_usage=True, which puts every parameter
        # registered meanwhile on the meta device. The bias is base-model state that no adapter file restores, so it
        # is re-attached with its values (writing `_parameters` directly bypasses the patched register_parameter).
        layer._parameters["bias"] = nn.Parameter(source_bias.detach().clone(), requires_grad=False)
    if getattr(layer, "source_dtype", None) is None:
        layer.source_dtype = source_dtype(module)
    return layer


def source_dtype(module: nn.Module):
    """The float dtype of the layer PEQA replaces: PEFT creates adapter weights in it (then autocasts to fp32).

    A float weight's dtype; else the dtype of the checkpoint's scales (llm-compressor and GPTQ store them in the
    model's dtype); ``None`` when neither exists.
    """
    for name in ("weight", "weight_scale", "scales", "bias"):
        tensor = getattr(module, name, None)
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            return tensor.dtype
    return None


def resolve_all_linear(config: PeqaConfig, model: nn.Module) -> PeqaConfig:
    """Expand ``target_modules="all-linear"`` to every layer a backend can read, as PEFT does for ``nn.Linear``.

    PEFT's own expansion only knows ``nn.Linear`` / ``Conv1D``; a model loaded with ``PeqaQuantizationConfig`` or
    from a GPTQ checkpoint has its linear layers in other classes. The output head stays excluded, as in PEFT, and
    so do modules inside existing adapter layers (the adapter layers themselves are kept, for a second adapter).
    """
    target = config.target_modules
    if not (isinstance(target, str) and target.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND):
        return config
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inner = {
        f"{prefix}.{suffix}" if prefix else suffix
        for prefix, m in model.named_modules()
        if isinstance(m, BaseTunerLayer)
        for suffix, _ in m.named_modules()
        if suffix
    }
    names = {
        name
        for name, m in model.named_modules()
        if name and name not in inner and m is not head and (isinstance(m, BaseTunerLayer) or find_backend(m))
    }
    config.target_modules = names
    return config


def hand_over_quantization(model: nn.Module, config: PeqaConfig) -> bool:
    """Make a model whose quantized checkpoint layers were all adopted save and reload as a PEQA-quantized model.

    transformers keeps the checkpoint's quantizer (compressed-tensors, GPTQ) on the model; once every layer of that
    format is a ``QuantLinear``, ``save_pretrained`` (e.g. of ``merge_and_unload()``) would write PEQA's tensors under
    the old ``quantization_config`` and the reload would silently mis-read them. So the model's quantization metadata
    becomes PEQA's (``PeqaQuantizationConfig`` naming the adopted layers) and compressed-tensors' decompress-on-first-
    forward hook is removed. Returns whether it handed over (not when some layers of the old format remain).
    """
    from ....integrations.transformers.quantizer import PeqaHfQuantizer, PeqaQuantizationConfig

    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or isinstance(quantizer, PeqaHfQuantizer):
        return False
    if any(find_backend(m) in (compressed_tensors, gptq) for m in model.modules()):
        warnings.warn(
            "Some layers of the quantized checkpoint were not adopted by PEQA, so the model keeps the checkpoint's "
            "quantization_config: save_pretrained of it (or of merge_and_unload()) would not reload correctly. "
            "Save the adapter instead, or target every quantized layer.",
            stacklevel=3,
        )
        return False
    hook = getattr(model, "ct_decompress_hook", None)
    if hook is not None:
        hook.remove()
        del model.ct_decompress_hook
    names = sorted({n.removesuffix(".base_layer") for n, m in model.named_modules() if isinstance(m, QuantLinear)})
    qconfig = PeqaQuantizationConfig(bits=config.bits, group_size=config.group_size, target_modules=names)
    model.hf_quantizer = PeqaHfQuantizer(qconfig, pre_quantized=True)
    model.config.quantization_config = qconfig
    model.quantization_method = qconfig.quant_method
    return True


def check_adopted_grid(bits: int, group_size: int | None, config: PeqaConfig, key: str, source: str) -> None:
    """A PeqaConfig must state the grid of an already quantized layer: silently re-quantizing would lose it.

    ``adopt_checkpoint_grid=True`` lets every such layer keep its own grid; ``group_size="auto"`` adopts the group
    size of the first such layer (the others must then share it).
    """
    if config.adopt_checkpoint_grid:
        return
    if config.group_size == AUTO:
        config.group_size = group_size
    if (bits, group_size) != (config.bits, config.group_size):
        raise ValueError(
            f"Layer '{key}' is already quantized ({source}: bits={bits}, group_size={group_size}) but the PeqaConfig "
            f"asks for bits={config.bits}, group_size={config.group_size}; PEQA adopts the existing integers and "
            f"scales, so pass PeqaConfig(bits={bits}, group_size={group_size}, ...), or "
            "PeqaConfig(adopt_checkpoint_grid=True, ...) to keep each quantized layer's own grid (mixed checkpoints "
            "such as GGUF Q4_K_M), or exclude the layer."
        )


__all__ = [
    "BACKENDS",
    "hand_over_quantization",
    "check_adopted_grid",
    "check_target",
    "find_backend",
    "resolve_all_linear",
    "resolve_group_size",
    "resolve_init_method",
    "to_quant_linear",
]
