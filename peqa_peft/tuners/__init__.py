"""PEFT tuners provided by peqa_peft, one package per method (config, layer, model), as in PEFT itself."""

from .peqa import PeqaConfig, PeqaModel

__all__ = ["PeqaConfig", "PeqaModel"]
