"""The QFT tuner: turns the targeted linear layers into trainable integer weights (full-parameter tuning)."""

from __future__ import annotations

from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from transformers.pytorch_utils import Conv1D

from .._base import QuantTunerMixin
from .config import QftConfig
from .layer import Linear, QftLayer


class QftModel(QuantTunerMixin, BaseTuner):
    """Creates a QFT model from a pretrained transformers model (use it through ``peft.get_peft_model``).

    Every targeted ``nn.Linear`` / ``Conv1D`` is wrapped by a :class:`peqa_peft.tuners.qft.Linear` whose only weight
    is a trainable :class:`~peqa_peft.tuners.qft.tensor.QftWeight` (int8 codes + per-channel scales + float
    outliers); the float weight is released. Train it with :class:`peqa_peft.optim.IntLion`. Non-targeted
    parameters are frozen unless listed in ``modules_to_save``. All targets are validated before the first module
    is replaced, so a failing call leaves the model as it was.

    Example:

        ```py
        >>> import peqa_peft
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peqa_peft.QftConfig(task_type="CAUSAL_LM"))
        >>> optimizer = peqa_peft.IntLion(model.parameters(), lr=1e-4)
        ```
    """

    prefix: str = "qft_"
    tuner_layer_cls = QftLayer

    def _check_new_adapter_config(self, config: QftConfig) -> None:
        super()._check_new_adapter_config(config)
        if len(self.peft_config) > 1:
            raise ValueError(
                "QFT tunes the model's weights themselves, so a model can hold only one QFT adapter; load a fresh "
                "base model for another one."
            )

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        if state_dict is None:
            self._validate_targets(model, self.peft_config[adapter_name])
        super().inject_adapter(
            model,
            adapter_name,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
            state_dict=state_dict,
        )

    def _validate_targets(self, model: nn.Module, config: QftConfig) -> None:
        """Raise before anything is replaced if a target is not a linear layer or shares its weight."""
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        tied = getattr(embeddings, "weight", None)
        for key, module in self._find_targets(model, config).items():
            if isinstance(module, QftLayer):
                raise ValueError(f"Module '{key}' is already a QFT layer; a model can hold only one QFT adapter.")
            if not isinstance(module, (nn.Linear, Conv1D)):
                raise TypeError(
                    f"Target module '{key}' is a {type(module).__name__}; QFT supports torch.nn.Linear and "
                    "transformers' Conv1D. Adjust `target_modules` or add it to `exclude_modules`."
                )
            if tied is not None and module.weight is tied:
                raise ValueError(
                    f"Target module '{key}' shares its weight with the input embeddings (tie_word_embeddings); QFT "
                    "replaces the weight by integers, which would silently untie them. Exclude it or untie first."
                )

    def _create_and_replace(
        self,
        peft_config: QftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        if isinstance(target, QftLayer):
            target.update_layer(adapter_name, peft_config)  # raises: one QFT adapter per model
            return
        new_module = Linear(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # QFT weights are integers (+ float32 outliers/scales); PEFT's fp16/bf16 -> fp32 upcast does not apply.
        return None
