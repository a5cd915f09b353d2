"""QFT tuner layers: a linear layer whose only weight is a trainable integer ``QftWeight``."""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...core.qft.embedding import qft_embedding
from ...core.qft.linear import qft_linear
from ...core.qft.weight import WEIGHT_FIELDS, QftWeight
from ...integrations.distributed import fsdp
from .config import QftConfig

SUPPORTED_LAYERS = (nn.Linear, Conv1D, nn.Embedding)


class QftWeightDict(nn.ParameterDict):
    """``ParameterDict`` of ``QftWeight``\\ s whose ``state_dict`` holds their plain integer/float tensors.

    A key ``...qft_weight.<adapter>`` becomes ``...qft_weight.<adapter>.codes``, ``.scale``, ``.zero_point``,
    ``.outlier_idx`` and ``.outlier_val``: tensors safetensors can store, and the names PEFT's adapter-name handling
    maps to ``...qft_weight.codes`` etc. in the checkpoint. Loading copies into the existing weights in place, so an
    optimizer holding them (``resume_from_checkpoint``) keeps working. Under FSDP2 (``DTensor`` params) saving
    gathers the full integer weights and loading takes each rank's rows (see :mod:`.fsdp`).
    """

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        for name, weight in self._parameters.items():
            if not isinstance(weight, QftWeight):  # sharded by FSDP2: gathered here, so every rank must call this
                fsdp.expose_fields(weight)
                weight = fsdp.gather_full(weight)
            for field, tensor in weight.state_tensors().items():
                destination[f"{prefix}{name}.{field}"] = tensor if keep_vars else tensor.detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        for name, weight in self._parameters.items():
            keys = {field: f"{prefix}{name}.{field}" for field in WEIGHT_FIELDS}
            absent = [key for key in keys.values() if key not in state_dict]
            if absent:
                missing_keys.extend(absent)
                continue
            fields = {field: state_dict[key] for field, key in keys.items()}
            try:
                if isinstance(weight, QftWeight):
                    weight.load_state_tensors_(fields)
                else:  # sharded by FSDP2: load this rank's rows of the full weight
                    fsdp.load_full_(weight, QftWeight(*fields.values(), weight.dtype))
            except ValueError as err:
                error_msgs.append(f"{prefix}{name}: {err}")

    def _apply(self, fn, recurse: bool = True):
        # Module._apply would try `param.data = fn(param)` / swap_tensors; a QftWeight converts by re-wrapping.
        for name, weight in list(self._parameters.items()):
            # A tied embedding pair is one Parameter in two dicts: the second dict must get the first one's new
            # Parameter, not a copy of its own. `fn` is the same object for every module of one `.to()` call.
            done = _CONVERTED.get(id(weight))
            if done is not None and done[0]() is weight and done[1] is fn:
                self._parameters[name] = done[2]
                continue
            with torch.no_grad():
                new = fn(weight)
            # `.to()` to the weight's own device/dtype still re-wraps a QftWeight; keeping the original Parameter then
            # matters: an optimizer built before `model.to(device)` (Trainer + accelerate under DDP) holds it.
            if new is not weight and (new.device, new.dtype) != (weight.device, weight.dtype):
                self._parameters[name] = nn.Parameter(new, requires_grad=weight.requires_grad)
                key = id(weight)
                gone = weakref.ref(weight, lambda _ref, key=key: _CONVERTED.pop(key, None))
                _CONVERTED[key] = (gone, fn, self._parameters[name])
        return self


# id(old Parameter) -> (weak ref to it, conversion function, its new Parameter): lets a weight shared by two layers
# (tied embeddings) stay shared across `.to()`. Keyed by id, as a QftWeight has no `==`; an entry goes with the old
# weight (the weak ref's callback).
_CONVERTED: dict[int, tuple] = {}


def _float_weight(module: nn.Module) -> torch.Tensor:
    """The 2-D weight QFT stores by rows: ``(out, in)`` of a linear layer, ``(num_embeddings, dim)`` of a table."""
    if isinstance(module, Conv1D):
        return module.weight.t()  # Conv1D stores (in_features, out_features)
    if isinstance(module, (nn.Linear, nn.Embedding)):
        return module.weight
    raise TypeError(
        f"QFT supports torch.nn.Linear, transformers' Conv1D and torch.nn.Embedding, got {type(module).__name__}"
    )


def check_embedding_options(module: nn.Embedding, name: str = "embedding") -> None:
    """Refuse ``nn.Embedding`` options the integer lookup does not implement (they would be silently ignored)."""
    unsupported = {
        "max_norm": module.max_norm is not None,
        "scale_grad_by_freq": module.scale_grad_by_freq,
        "sparse": module.sparse,
    }
    used = [option for option, on in unsupported.items() if on]
    if used:
        raise ValueError(f"QFT cannot tune embedding '{name}': nn.Embedding option(s) {used} are not supported")


class QftLayer(BaseTunerLayer):
    """Mixin holding ``qft_weight[adapter]``: the integer weight that replaces the base layer's float weight.

    QFT is full fine-tuning, so the base layer's float weight is released when the QFT weight is created: the
    integers are the only copy, and there is one QFT adapter per model. The base layer keeps its bias (frozen).
    """

    adapter_layer_names = ("qft_weight",)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        if not isinstance(base_layer, SUPPORTED_LAYERS):
            raise TypeError(
                "QFT supports torch.nn.Linear, transformers' Conv1D and torch.nn.Embedding, got "
                f"{type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        self.qft_weight = QftWeightDict({})
        self._disable_adapters = False
        self.merged_adapters = []
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.out_features, self.in_features = _float_weight(base_layer).shape

    def update_layer(self, adapter_name: str, config: QftConfig, **kwargs: Any) -> None:
        """Quantize the base weight into ``qft_weight[adapter_name]`` and free the float copy."""
        if len(self.qft_weight):
            raise ValueError(
                f"this layer already holds the QFT weight of adapter '{next(iter(self.qft_weight))}'; QFT tunes the "
                f"weights themselves, so a model can hold only one QFT adapter (cannot add '{adapter_name}')."
            )
        base = self.get_base_layer()
        weight = QftWeight.from_float(
            _float_weight(base),
            outlier_fraction=config.outlier_fraction,
            int8_grad=config.int8_gradients,
            refresh_every=config.outlier_refresh_steps,
            method=config.init_method,
        )
        self.qft_weight[adapter_name] = nn.Parameter(weight, requires_grad=True)
        base.weight = None  # no float master copy: the integer weight is the model's only weight
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def dequantized_weight(self, adapter_name: str) -> torch.Tensor:
        """The float weight in the base layer's layout (``(in, out)`` for ``Conv1D``)."""
        weight = self.qft_weight[adapter_name].dequantize()
        return weight.t().contiguous() if self.fan_in_fan_out else weight


class Linear(nn.Module, QftLayer):
    """QFT layer over an ``nn.Linear`` or transformers ``Conv1D``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: QftConfig, **kwargs: Any) -> None:
        super().__init__()
        QftLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Write the dequantized weight into the base layer as a plain float ``weight`` (for export)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        name = adapter_names[0]
        weight = self.dequantized_weight(name)
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
        self.get_base_layer().weight = nn.Parameter(weight, requires_grad=False)
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Drop the float copy again (the integer weight was never changed by merging)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self.get_base_layer().weight = None
        self.merged_adapters.clear()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            raise RuntimeError(
                "QFT replaces the base weights (no float copy is kept), so there is no base model to run with the "
                "adapter disabled; merge_and_unload() the model or load a fresh base model instead."
            )
        base = self.get_base_layer()
        if self.merged:
            return base(x)
        return self._qft_forward(x, self.qft_weight[self.active_adapters[0]], base)

    def _qft_forward(self, x: torch.Tensor, weight: QftWeight, base: nn.Module) -> torch.Tensor:
        return qft_linear(x, weight, base.bias)

    def __repr__(self) -> str:
        return "qft." + super().__repr__()


class Embedding(Linear):
    """QFT layer over an ``nn.Embedding``: the ``(num_embeddings, dim)`` table as a trainable integer weight.

    Lookups dequantize only the rows they read; the weight gradient is built chunk by chunk of the vocabulary
    (see :mod:`peqa_peft.core.qft.embedding`). Merging writes the float table back into the base embedding.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: QftConfig, **kwargs: Any) -> None:
        if not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"qft.Embedding wraps a torch.nn.Embedding, got {type(base_layer).__name__}")
        check_embedding_options(base_layer)
        super().__init__(base_layer, adapter_name, config, **kwargs)

    def _qft_forward(self, x: torch.Tensor, weight: QftWeight, base: nn.Module) -> torch.Tensor:
        return qft_embedding(x, weight, base.padding_idx)


__all__ = ["Embedding", "Linear", "QftLayer", "QftWeightDict", "check_embedding_options"]
