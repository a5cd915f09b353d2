"""The PEQA tuner: quantizes the targeted linear layers once and attaches scale-delta adapters to them."""

from __future__ import annotations

import logging
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from tqdm.auto import tqdm

from ...core import QuantLinear
from ...core.quantizer import AUTO
from ...integrations.transformers.stored_weights import StoredWeights
from .._base import QuantTunerMixin
from . import backends
from .config import PeqaConfig
from .layer import Linear, PeqaLayer
from .validation import layer_fingerprint, verify_fingerprint

logger = logging.getLogger(__name__)


class PeqaModel(QuantTunerMixin, BaseTuner):
    """Creates a PEQA model from a pretrained transformers model (use it through ``peft.get_peft_model``).

    Every targeted ``nn.Linear`` / ``Conv1D`` is replaced by a :class:`peqa_peft.tuners.peqa.Linear` whose base is a
    :class:`~peqa_peft.core.QuantLinear`: the weight is quantized once to ``bits``-bit packed codes and its floating
    point copy is released. Adapters hold only scale deltas. Adding further adapters reuses the same quantized base.

    All checks (module types, group size, fingerprint of a loaded adapter) run before the first module is replaced,
    so a failing call leaves the model as it was.

    Example:

        ```py
        >>> import peqa_peft
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peqa_peft.PeqaConfig(bits=4, task_type="CAUSAL_LM"))
        >>> model.print_trainable_parameters()
        ```
    """

    @classmethod
    def check_saved_adapter(cls, weights, model, source, config=None, existing=None, hub_kwargs=None) -> None:
        """The weights (dtypes, finiteness, shapes, completeness; :mod:`.validation`) and, when the adapter is loaded
        into an ``existing`` PEQA adapter slot (``load_adapter(..., adapter_name=<existing>)``, as Trainer's resume
        does), the base fingerprint, which PEFT would otherwise skip."""
        from .validation import check_adapter_weights

        if config is None:
            config = PeqaConfig.from_pretrained(source, **(hub_kwargs or {}))
        check_adapter_weights(weights, config, model, source)
        if existing is not None:
            layers = {k: m for k, m in model.named_modules() if isinstance(m, PeqaLayer)}
            verify_fingerprint(layers, config)

    @classmethod
    def refuse_as_other_method(cls, keys, peft_type, source) -> None:
        """PEQA scale deltas under another ``peft_type`` (an edited or mixed-up ``adapter_config.json``)."""
        from .validation import check_peft_type

        check_peft_type(keys, peft_type, source)

    prefix: str = "peqa_"
    tuner_layer_cls = PeqaLayer

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        config = self.peft_config[adapter_name]
        self._pending_quant: dict[str, QuantLinear] = {}
        if state_dict is None:
            self._pending_quant = self._quantize_targets(model, config)
        try:
            super().inject_adapter(
                model,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
                state_dict=state_dict,
            )
        finally:
            self._pending_quant = {}
        self._record_fingerprint(model, config, adapter_name)
        backends.hand_over_quantization(model, config)

    def _prepare_adapter_config(self, peft_config: PeqaConfig, model_config: dict) -> PeqaConfig:
        peft_config = super()._prepare_adapter_config(peft_config, model_config)
        # "all-linear" must also cover already quantized layers (QuantLinear, GPTQ), which PEFT does not know
        return backends.resolve_all_linear(peft_config, self.model)

    def _quantize_targets(self, model: nn.Module, config: PeqaConfig) -> dict[str, QuantLinear]:
        """Validate every target, then build the packed base of each one (the model itself is not touched here).

        ``backends`` picks, per target, how its base is obtained: float layers are quantized, layers of a quantized
        checkpoint (compressed-tensors, GPTQ) are adopted with their own integers and scales, a ``QuantLinear``
        is reused.
        """
        targets = self._find_targets(model, config)
        # layers transformers decompressed from a compressed-tensors checkpoint keep the checkpoint's codes
        adopted = backends.compressed_tensors.dequantized_targets(model, targets, config)
        if adopted:
            logger.info(
                "PEQA: %d dequantized layer(s) adopted in their checkpoint's compressed-tensors codes", len(adopted)
            )
        targets.update(adopted)
        backends.resolve_group_size(config, targets)
        backends.resolve_init_method(config)
        for key, module in targets.items():
            if not isinstance(module, PeqaLayer):
                backends.check_target(module, config, key)
        to_convert = {k: m for k, m in targets.items() if not isinstance(m, (QuantLinear, PeqaLayer))}
        pending = {}
        progress = tqdm(to_convert.items(), desc=f"PEQA: {config.bits}-bit base layers", unit="layer")
        stored = StoredWeights(model)  # 16-bit loaded weights are quantized from the checkpoint's own float32
        for key, module in progress:
            pending[key] = backends.to_quant_linear(module, config, key, stored.weight_for(key, module))
        if stored.used:
            logger.info(
                "PEQA: quantized %d layer(s) from the checkpoint's stored weights (the loaded ones are their "
                "16-bit rounding), so the codes match a float32 load of the same checkpoint",
                stored.used,
            )
        self._verify_fingerprint(
            {**{k: m for k, m in targets.items() if isinstance(m, (QuantLinear, PeqaLayer))}, **pending}, config
        )
        return pending

    def _verify_fingerprint(self, layers: dict[str, nn.Module], config: PeqaConfig) -> None:
        verify_fingerprint(layers, config)

    def _record_fingerprint(self, model: nn.Module, config: PeqaConfig, adapter_name: str) -> None:
        """Record the fingerprint of the base in a new adapter's config (loaded configs were checked before)."""
        if config.base_fingerprint:
            return
        layers = {
            key: layer_fingerprint(module)
            for key, module in model.named_modules()
            if isinstance(module, PeqaLayer) and adapter_name in module.peqa_scale
        }
        config.base_fingerprint = {"bits": config.bits, "group_size": config.group_size, "layers": layers}
        if config.adopt_checkpoint_grid:
            # each layer keeps its own grid: record it (the layer hashes include it too)
            config.base_fingerprint["grids"] = {
                key: [module.get_base_layer().bits, module.get_base_layer().group_size]
                for key, module in model.named_modules()
                if isinstance(module, PeqaLayer) and adapter_name in module.peqa_scale
            }

    def _create_and_replace(
        self,
        peft_config: PeqaConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        if isinstance(target, PeqaLayer):
            target.update_layer(adapter_name, peft_config)
            return
        base = self._pending_quant.pop(current_key, None)
        if base is None:
            base = self._quantize_one(target, peft_config, current_key)
        new_module = Linear(base, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _quantize_one(target: nn.Module, config: PeqaConfig, key: str) -> QuantLinear:
        # Only reached when PEFT matches modules from a state_dict instead of the config.
        return backends.to_quant_linear(target, config, key)

    def _check_safe_merge(self, adapter_names: Optional[list[str]]) -> None:
        """Check every layer before any is merged, so a refused ``safe_merge`` changes nothing."""
        for key, module in self.model.named_modules():
            if isinstance(module, Linear):
                names = [n for n in (adapter_names or module.active_adapters) if n not in module.merged_adapters]
                problem = module.merge_problem(names)
                if problem:
                    raise ValueError(f"layer '{key}': {problem}; nothing was merged")

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        if safe_merge:
            self._check_safe_merge(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(self, merge: bool = True, safe_merge: bool = False, **kwargs) -> nn.Module:
        if merge and safe_merge:
            self._check_safe_merge(kwargs.get("adapter_names"))
        return super()._unload_and_optionally_merge(merge=merge, safe_merge=safe_merge, **kwargs)

    def _check_new_adapter_config(self, config: PeqaConfig) -> None:
        super()._check_new_adapter_config(config)
        others = [c for c in self.peft_config.values() if c is not config]
        if others and config.group_size == AUTO:
            config.group_size = others[0].group_size  # one quantized base for all adapters: "auto" is its grid
        for other in others:
            if (other.bits, other.group_size, other.adopt_checkpoint_grid) != (
                config.bits,
                config.group_size,
                config.adopt_checkpoint_grid,
            ):
                raise ValueError(
                    f"All PEQA adapters of a model share one quantized base; the model uses bits={other.bits}, "
                    f"group_size={other.group_size}, adopt_checkpoint_grid={other.adopt_checkpoint_grid} but the new "
                    f"adapter asks for bits={config.bits}, group_size={config.group_size}, "
                    f"adopt_checkpoint_grid={config.adopt_checkpoint_grid}."
                )

    def merge_and_unload(self, *args, **kwargs) -> nn.Module:
        """Merge the scale deltas into ``s0`` and return the quantized transformers model.

        Its ``save_pretrained`` / ``push_to_hub`` write a compressed-tensors checkpoint (see
        :mod:`peqa_peft.integrations.formats.compressed_tensors.merged`) that transformers and vLLM load without
        peqa_peft.
        """
        from ...integrations.formats.compressed_tensors.merged import attach_compressed_save

        return attach_compressed_save(super().merge_and_unload(*args, **kwargs))

    def unload(self) -> nn.Module:
        """Remove the adapters and return the quantized base (saved like a merged model, as compressed-tensors)."""
        from ...integrations.formats.compressed_tensors.merged import attach_compressed_save

        return attach_compressed_save(super().unload())
