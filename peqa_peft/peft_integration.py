"""Everything that touches PEFT internals lives here, so a PEFT upgrade breaks in exactly one place.

PEFT's public ``register_peft_method`` only accepts names that already exist in its ``PeftType`` enum, so adding a
method from outside PEFT needs a new enum member. ``add_peft_type`` adds one the way ``enum`` itself would (member
maps, value lookup, attribute), which keeps ``PeftType("PEQA")``, JSON configs and pickling working.

Two small, idempotent wrappers of ``PeftModel`` methods make PEFT's generic code aware of packed weights:

- ``get_nb_trainable_parameters`` counts each packed weight as ``out_features * in_features`` parameters (as PEFT
  already does for bitsandbytes' ``Params4bit``), so ``print_trainable_parameters()`` reports a true percentage;
- ``create_or_update_model_card`` / ``push_to_hub`` write and upload a model card naming the method, bits, group size
  and base model (``transformers``' ``push_to_hub`` would otherwise replace PEFT's card with a generic one).

The PEFT versions this was written and tested against are pinned in ``pyproject.toml``;
``tests/test_registration.py`` fails loudly when an upgrade changes any of these internals.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from peft import PeftModel
from peft.utils import PeftType, register_peft_method

TESTED_PEFT_VERSIONS = ("0.21",)
_PATCH_MARKER = "_peqa_peft_patched"


def add_peft_type(name: str) -> PeftType:
    """Add ``name`` (upper case) as a member of ``peft.utils.PeftType``; a no-op when it already exists."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member.__init__(name)
    if hasattr(PeftType, "_sort_order_"):
        member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    # EnumType.__setattr__ refuses to rebind members; the member does not exist yet, so set it on the type directly.
    type.__setattr__(PeftType, name, member)
    return member


def register_method(name: str, config_cls: type, model_cls: type) -> PeftType:
    """Register a tuner with PEFT under ``name`` (lower case), idempotently."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    peft_type = add_peft_type(name.upper())
    registered = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if registered is None:
        register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls)
    elif registered is not model_cls:
        raise RuntimeError(f"PEFT type {peft_type} is already registered to {registered.__name__}")
    return peft_type


def _patch(cls: type, attr: str, make_wrapper: Callable[[Callable], Callable]) -> None:
    original = getattr(cls, attr)
    if getattr(original, _PATCH_MARKER, False):
        return
    wrapper = functools.wraps(original)(make_wrapper(original))
    setattr(wrapper, _PATCH_MARKER, True)
    setattr(cls, attr, wrapper)


def _count_packed_weights(original):
    def get_nb_trainable_parameters(self):
        from .quant import QuantLinear

        trainable, total = original(self)
        total += sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, QuantLinear))
        return trainable, total

    return get_nb_trainable_parameters


def _our_configs(model: PeftModel) -> list:
    ours = {"PEQA", "QFT"}
    return [c for c in model.peft_config.values() if getattr(c, "peft_type", None) in ours]


def _card_with_method_section(original):
    def create_or_update_model_card(self, output_dir: str):
        original(self, output_dir)
        configs = _our_configs(self)
        if configs:
            from .hub import add_method_section

            add_method_section(output_dir, configs, self)

    return create_or_update_model_card


def _push_with_our_card(original):
    def push_to_hub(self, repo_id: str, *args, **kwargs):
        if not _our_configs(self):
            return original(self, repo_id, *args, **kwargs)
        from .hub import push_adapter_to_hub

        return push_adapter_to_hub(self, repo_id, *args, **kwargs)

    return push_to_hub


def patch_peft_model() -> None:
    """Install the ``PeftModel`` wrappers described in the module docstring (idempotent)."""
    _patch(PeftModel, "get_nb_trainable_parameters", _count_packed_weights)
    _patch(PeftModel, "create_or_update_model_card", _card_with_method_section)
    _patch(PeftModel, "push_to_hub", _push_with_our_card)
