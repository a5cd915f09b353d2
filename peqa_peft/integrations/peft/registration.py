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
import os
from collections.abc import Callable

from peft import PeftModel
from peft.utils import PeftType, register_peft_method

TESTED_PEFT_VERSIONS = ("0.21",)
_PATCH_MARKER = "_peqa_peft_patched"
_FINGERPRINT_OVERRIDE = "_peqa_peft_skip_fingerprint"
# PEFT type name -> tuner class of each method registered through register_method (they validate their adapters)
_METHODS: dict[str, type] = {}


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
    _METHODS[peft_type.value] = model_cls
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
        from ...core import QuantLinear

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
            from ..hub import add_method_section

            add_method_section(output_dir, configs, self)

    return create_or_update_model_card


def _push_with_our_card(original):
    def push_to_hub(self, repo_id: str, *args, **kwargs):
        if not _our_configs(self):
            return original(self, repo_id, *args, **kwargs)
        from ..hub import push_adapter_to_hub

        return push_adapter_to_hub(self, repo_id, *args, **kwargs)

    return push_to_hub


def _hub_kwargs(kwargs: dict) -> dict:
    return {k: kwargs[k] for k in ("subfolder", "revision", "cache_dir", "token") if kwargs.get(k) is not None}


def _saved_peft_type(model_id: str, hub_kwargs: dict) -> str:
    """The ``peft_type`` of a saved adapter, refusing one that no registered PEFT method has."""
    from peft.config import PeftConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    peft_type = PeftConfig._get_peft_type(model_id, **hub_kwargs)
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise ValueError(f"{model_id}: adapter_config.json has unknown peft_type {peft_type!r}")
    return peft_type


def _read_weights(model_id: str, hub_kwargs: dict) -> dict:
    from peft.utils import load_peft_weights

    try:
        return load_peft_weights(model_id, device="cpu", **hub_kwargs)
    except (OSError, ValueError):
        raise
    except Exception as err:  # safetensors raises its own SafetensorError for a corrupt file
        raise ValueError(f"{model_id}: cannot read the adapter weights: {err}") from err


def check_saved_adapter(model, model_id: str, config=None, existing=None, **kwargs) -> None:
    """Validate a saved adapter against ``model`` (the transformers model) before PEFT changes anything.

    Adapters of a method registered here are checked by its tuner class (``check_saved_adapter``); before that,
    and for every other ``peft_type``, weights that a registered method recognises as its own but saved under another
    ``peft_type`` are refused (``refuse_as_other_method``; other methods' weights are PEFT's to check, so for them
    only the key names are read, and only from a local file).
    """
    from peft.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors import safe_open

    hub_kwargs = _hub_kwargs(kwargs)
    peft_type = config.peft_type if config is not None else _saved_peft_type(model_id, hub_kwargs)
    name = getattr(peft_type, "value", peft_type)
    ours = _METHODS.get(name)
    if ours is None:
        local = os.path.join(model_id, kwargs.get("subfolder") or "", SAFETENSORS_WEIGHTS_NAME)
        if os.path.isfile(local):
            with safe_open(local, framework="pt") as f:
                _refuse_other_methods_weights(dict.fromkeys(f.keys()), peft_type, model_id)
        return
    weights = _read_weights(model_id, hub_kwargs)
    _refuse_other_methods_weights(weights, peft_type, model_id)
    if existing is not None and getattr(existing, _FINGERPRINT_OVERRIDE, False):
        existing = None
    ours.check_saved_adapter(weights, model, model_id, config=config, existing=existing, hub_kwargs=hub_kwargs)


def _refuse_other_methods_weights(keys, peft_type, source: str) -> None:
    name = getattr(peft_type, "value", peft_type)
    for method, tuner_cls in _METHODS.items():
        if method != name:
            tuner_cls.refuse_as_other_method(keys, peft_type, source)


def _validate_from_pretrained(original):
    def from_pretrained(cls, model, model_id, adapter_name="default", is_trainable=False, config=None, **kwargs):
        check_saved_adapter(model, str(model_id), config, **kwargs)
        if config is not None and getattr(config, "base_fingerprint", True) is None:
            # The documented override: PEFT then loads the weights into the slot this config creates, where the
            # fingerprint on disk must not be checked either. (Not a dataclass field, so never saved.)
            setattr(config, _FINGERPRINT_OVERRIDE, True)
        return original.__func__(cls, model, model_id, adapter_name, is_trainable, config, **kwargs)

    return from_pretrained


def _validate_load_adapter(original):
    def load_adapter(self, model_id, adapter_name, *args, **kwargs):
        existing = self.peft_config.get(adapter_name)
        check_saved_adapter(self.base_model.model, str(model_id), None, existing, **kwargs)
        return original(self, model_id, adapter_name, *args, **kwargs)

    return load_adapter


def patch_peft_model() -> None:
    """Install the ``PeftModel`` wrappers described in the module docstring (idempotent)."""
    _patch(PeftModel, "get_nb_trainable_parameters", _count_packed_weights)
    _patch(PeftModel, "create_or_update_model_card", _card_with_method_section)
    _patch(PeftModel, "push_to_hub", _push_with_our_card)
    _patch(PeftModel, "load_adapter", _validate_load_adapter)
    if not getattr(PeftModel.from_pretrained, _PATCH_MARKER, False):
        wrapper = functools.wraps(PeftModel.from_pretrained)(_validate_from_pretrained(PeftModel.from_pretrained))
        setattr(wrapper, _PATCH_MARKER, True)
        PeftModel.from_pretrained = classmethod(wrapper)
