"""What PEQA and QFT share as PEFT tuners: target-selection config fields and target discovery.

Both methods replace each targeted linear layer by a quantized one, so both pre-scan the model for targets before
PEFT replaces anything (to fail early, leaving the model untouched) and both default to every linear layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTunerLayer, _ExcludedModule, _maybe_include_all_linear_layers
from torch import nn


@dataclass
class QuantTargetsConfig(PeftConfig):
    """PEFT's target-selection options, with ``target_modules=None`` meaning ``"all-linear"``."""

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Modules to quantize and tune: names, a regex, or 'all-linear' (the default if None)."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Names or a regex of modules to leave untouched."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only transform layers with these indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list the indices refer to (e.g. 'layers')."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Non-targeted modules trained in full and saved with the adapter."}
    )

    def _check_targets(self) -> None:
        """Normalise and validate the target options the way LoRA does."""
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("`layers_pattern` is only used together with `layers_to_transform`.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str (regex).")


class QuantTunerMixin:
    """Methods shared by the PEQA and QFT ``BaseTuner`` subclasses."""

    target_module_mapping: dict[str, list[str]] = {}

    @classmethod
    def check_saved_adapter(
        cls, weights: dict, model: nn.Module, source: str, config=None, existing=None, hub_kwargs=None
    ) -> None:
        """Validate a saved adapter of this method (``weights`` read from ``source``) against ``model`` before PEFT
        loads it; ``existing`` is the adapter slot it loads into, if any. Each method says what it checks."""
        raise NotImplementedError(f"{cls.__name__} does not validate saved adapters")

    @classmethod
    def refuse_as_other_method(cls, keys, peft_type: str, source: str) -> None:
        """Refuse this method's adapter weights (their ``keys``) saved under another method's ``peft_type``."""

    def _prepare_adapter_config(self, peft_config: QuantTargetsConfig, model_config: dict) -> QuantTargetsConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = "all-linear"
        return peft_config

    def _find_targets(self, model: nn.Module, config: QuantTargetsConfig) -> dict[str, nn.Module]:
        """The modules ``config`` targets, resolved exactly as PEFT's injection will resolve them."""
        self._prepare_adapter_config(config, self.get_model_config(model))
        _maybe_include_all_linear_layers(config, model)
        inside_tuner = [name + "." for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
        targets = {}
        for key, module in model.named_modules():
            if not key or any(key.startswith(prefix) for prefix in inside_tuner):
                continue
            match = self._check_target_module_exists(config, key)
            if match and not isinstance(match, _ExcludedModule):
                targets[key] = module
        return targets

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # New layers are created on their weight's device, and quantized layers have no float `weight` for PEFT's
        # generic weight-sharing/device logic to copy: plain assignment is all that is needed.
        setattr(parent, child_name, new_module)
