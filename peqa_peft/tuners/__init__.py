"""PEFT tuners provided by peqa_peft, one package per method (config, layer, model), as in PEFT itself."""

from .peqa import PeqaConfig, PeqaModel
from .qft import QftConfig, QftModel

__all__ = ["PeqaConfig", "PeqaModel", "QftConfig", "QftModel"]
