"""The QFT tuner: turns the targeted linear layers into trainable integer weights (full-parameter tuning)."""

from __future__ import annotations

import logging
import warnings
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, _ExcludedModule, _maybe_include_all_linear_layers
from torch import nn

from ...core.qft.weight import QftWeight
from ...integrations.distributed.ddp import ddp_ignored_names
from .._base import QuantTunerMixin
from .config import QftConfig
from .layer import SUPPORTED_LAYERS, Embedding, Linear, QftLayer, check_embedding_options

logger = logging.getLogger(__name__)


def _module_name(model: nn.Module, module: Optional[nn.Module]) -> Optional[str]:
    if module is None:
        return None
    return next((name for name, m in model.named_modules() if m is module), None)


def _embedding_modules(model: nn.Module) -> tuple[Optional[nn.Module], Optional[nn.Module]]:
    """The model's input embeddings and output head, where it has them."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    try:
        return (get_in() if callable(get_in) else None), (get_out() if callable(get_out) else None)
    except NotImplementedError:
        return None, None


def _tied_pair(model: nn.Module) -> tuple[Optional[nn.Module], Optional[nn.Module]]:
    """``(input embeddings, output head)`` if the head's weight *is* the embeddings' weight, else ``(None, None)``."""
    embeddings, head = _embedding_modules(model)
    weight = getattr(embeddings, "weight", None)
    if weight is not None and getattr(head, "weight", None) is weight:
        return embeddings, head
    return None, None


def tied_embeddings_note(config: QftConfig) -> Optional[str]:
    """One line saying what QFT made of a tied input/output embedding pair (``None`` if the model ties none)."""
    if config.tied_embeddings == "integer":
        return (
            "QFT: the output head shares its weight with the input embeddings (tie_word_embeddings): the tied pair is "
            "ONE integer weight, read by the embedding lookup and the output projection (it stays tied)."
        )
    if config.tied_embeddings == "float":
        how = "trained in float like the norms" if config.full_parameter else "frozen (full_parameter=False)"
        return (
            "QFT: the output head shares its weight with the input embeddings (tie_word_embeddings) and is not a QFT "
            f"target (e.g. excluded for TRL's SFTTrainer), so the tied pair stays ONE float weight, {how}; the other "
            "targeted weights are integer weights."
        )
    return None


class QftModel(QuantTunerMixin, BaseTuner):
    """Creates a QFT model from a pretrained transformers model (use it through ``peft.get_peft_model``).

    Every targeted ``nn.Linear`` / ``Conv1D`` is wrapped by a :class:`peqa_peft.tuners.qft.Linear` whose only weight
    is a trainable :class:`~peqa_peft.core.qft.weight.QftWeight` (int8 codes + per-channel scales + float
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

    @classmethod
    def check_saved_adapter(cls, weights, model, source, config=None, existing=None, hub_kwargs=None) -> None:
        """Every saved integer weight: complete, in range, fitting its layer (:mod:`.validation`)."""
        from .validation import check_qft_weights

        check_qft_weights(weights, model, source)

    prefix: str = "qft_"
    tuner_layer_cls = QftLayer
    _extra_targets: frozenset = frozenset()

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
        config = self.peft_config[adapter_name]
        self._extra_targets = self._full_parameter_targets(model, config)
        targets = self._validate_targets(model, config) if state_dict is None else {}
        embeddings, head = _tied_pair(model)
        if state_dict is None:  # checked before anything is replaced
            chosen = list(targets.values())
            self._record_tied_embeddings(config, embeddings, embeddings in chosen and head in chosen)
        super().inject_adapter(
            model,
            adapter_name,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
            state_dict=state_dict,
        )
        if embeddings is not None and (state_dict is not None or config.tied_embeddings == "integer"):
            self._share_tied_weight(model, adapter_name)
        if state_dict is not None:  # targets came from the file: what it made of the pair is known only now
            now_in, now_out = _embedding_modules(model)
            self._record_tied_embeddings(
                config, embeddings, isinstance(now_in, QftLayer) and isinstance(now_out, QftLayer)
            )
        note = tied_embeddings_note(config)
        if note:
            logger.info(note)

    @staticmethod
    def _record_tied_embeddings(config: QftConfig, tied: Optional[nn.Module], integer: bool) -> None:
        """Set ``config.tied_embeddings`` to what QFT makes of the tied pair; a saved value must match it."""
        outcome = None if tied is None else ("integer" if integer else "float")
        if config.tied_embeddings is not None and config.tied_embeddings != outcome:
            raise ValueError(
                f"the adapter config says tied_embeddings={config.tied_embeddings!r}, but on this model and config "
                f"QFT makes {'no tied pair' if outcome is None else f'the tied pair {outcome}'} (a different base "
                "model, or changed target_modules / exclude_modules)"
            )
        config.tied_embeddings = outcome

    def _full_parameter_targets(self, model: nn.Module, config: QftConfig) -> frozenset:
        """Names of the input embeddings and output head, which ``full_parameter`` adds to the targets."""
        if not config.full_parameter:
            return frozenset()
        self._prepare_adapter_config(config, self.get_model_config(model))
        _maybe_include_all_linear_layers(config, model)  # as _find_targets will: "all-linear" never names the pair
        names, explicit = set(), set()
        for module in _embedding_modules(model):
            name = _module_name(model, module)
            match = BaseTuner._check_target_module_exists(config, name) if name else None
            if name and not isinstance(match, _ExcludedModule) and isinstance(module, SUPPORTED_LAYERS):
                names.add(name)
                if match:
                    explicit.add(name)
        # A tied pair is one weight: it becomes one integer weight only if both of its modules are targets. When
        # only full_parameter adds one of them (the other is excluded, as TRL's SFTTrainer needs for lm_head), that
        # implicit target is dropped and the pair stays one float weight, trained as a float parameter; a pair the
        # user split by naming one half in target_modules is refused by _validate_targets.
        pair = [_module_name(model, m) for m in _tied_pair(model) if m is not None]
        split = [name for name in pair if name in names]
        if len(split) == 1 and split[0] not in explicit:
            names.discard(split[0])
        return frozenset(names)

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        """DDP's protocol: its float buckets must not hold the integer weights (see ``.distributed``).

        Reached as an attribute of the ``PeftModel`` that Trainer / accelerate wrap, so the names are given relative
        to it, to this tuner and to the transformers model.
        """
        sync = self.peft_config[self.active_adapters[0]].ddp_gradient_sync
        return ddp_ignored_names(self.model, ("base_model.model.", "model.", ""), sync)

    def _check_target_module_exists(self, config: QftConfig, key: str):
        if key in self._extra_targets:
            return True
        return BaseTuner._check_target_module_exists(config, key)

    def _validate_targets(self, model: nn.Module, config: QftConfig) -> dict[str, nn.Module]:
        """Raise before anything is replaced if a target cannot be tuned; return the targets."""
        embeddings, head = _embedding_modules(model)
        tied = getattr(embeddings, "weight", None)
        targets = self._find_targets(model, config)
        chosen = list(targets.values())
        if tied is not None and getattr(head, "weight", None) is tied and (embeddings in chosen) != (head in chosen):
            raise ValueError(
                "The output head shares its weight with the input embeddings (tie_word_embeddings), and "
                "target_modules names only one of them; QFT can only turn the pair into one integer weight, or leave "
                "both float: name both or neither (full_parameter alone decides by whether lm_head is excluded), or "
                "untie first."
            )
        for key, module in targets.items():
            if isinstance(module, QftLayer):
                raise ValueError(f"Module '{key}' is already a QFT layer; a model can hold only one QFT adapter.")
            if not isinstance(module, SUPPORTED_LAYERS):
                raise TypeError(
                    f"Target module '{key}' is a {type(module).__name__}; QFT supports torch.nn.Linear, "
                    "transformers' Conv1D and torch.nn.Embedding. Adjust `target_modules` or add it to "
                    "`exclude_modules`."
                )
            if isinstance(module, nn.Embedding):
                check_embedding_options(module, key)
            elif tied is not None and module.weight is tied and embeddings not in chosen:
                raise ValueError(
                    f"Target module '{key}' shares its weight with the input embeddings (tie_word_embeddings); QFT "
                    "replaces the weight by integers, which would silently untie them. Target the embeddings too "
                    "(`full_parameter=True` does), exclude it, or untie first."
                )
        return targets

    def _share_tied_weight(self, model: nn.Module, adapter_name: str) -> None:
        """Give a tied output head the embeddings' integer weight itself (one weight, gradients from both uses)."""
        embeddings, head = _embedding_modules(model)
        if isinstance(embeddings, QftLayer) and isinstance(head, QftLayer):
            head.qft_weight[adapter_name] = embeddings.qft_weight[adapter_name]

    def _integer_pair(self) -> bool:
        """Whether the model's tied embeddings are one shared integer weight right now."""
        embeddings, head = _embedding_modules(self.model)
        if not (isinstance(embeddings, QftLayer) and isinstance(head, QftLayer)):
            return False
        return any(embeddings.qft_weight[name] is head.qft_weight.get(name) for name in embeddings.qft_weight)

    def _check_merge_allowed(self) -> None:
        # PEFT warns that merging may untie a tied pair; one integer weight merges into one float weight (below).
        if not self._integer_pair():
            super()._check_merge_allowed()

    def _unload_and_optionally_merge(self, merge: bool = True, *args, **kwargs):
        """PEFT's unload; a tied integer pair becomes ONE float weight again (PEFT would merge it into two copies
        and set ``tie_word_embeddings=False``)."""
        tied = merge and self._integer_pair()
        with warnings.catch_warnings():
            if tied:
                warnings.filterwarnings("ignore", message="Input and output embeddings are no longer tied")
            model = super()._unload_and_optionally_merge(merge, *args, **kwargs)
        if tied:
            # Both copies are the same dequantization of the same integers: bit-identical, so either can be kept.
            model.get_output_embeddings().weight = model.get_input_embeddings().weight
            model.config.tie_word_embeddings = True
        return model

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        """PEFT's freezing, then (``full_parameter``) every remaining float parameter trainable again."""
        super()._mark_only_adapters_as_trainable(model)
        config = self.peft_config[self.active_adapters[0]]
        if getattr(config, "full_parameter", False) and not config.inference_mode:
            for param in model.parameters():
                if not isinstance(param, QftWeight) and param.is_floating_point():
                    param.requires_grad_(True)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """The QFT weights and, with ``full_parameter``, every float parameter (norms, biases): all that is tuned."""
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        if getattr(config, "full_parameter", False):
            floats = {name for name, p in model.named_parameters() if not isinstance(p, QftWeight)}
            selected.update({k: v for k, v in state_dict.items() if k in floats})
        return selected

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
        layer_cls = Embedding if isinstance(target, nn.Embedding) else Linear
        new_module = layer_cls(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # QFT weights are integers (+ float32 outliers/scales); PEFT's fp16/bf16 -> fp32 upcast does not apply.
        return None
