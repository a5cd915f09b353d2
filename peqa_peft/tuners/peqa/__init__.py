"""PEQA: Parameter-Efficient and Quantization-aware Adaptation (scale-only fine-tuning of packed low-bit weights)."""

from ...integrations.peft.registration import register_method
from .config import PeqaConfig
from .layer import Linear, PeqaLayer
from .model import PeqaModel

register_method("peqa", PeqaConfig, PeqaModel)

__all__ = ["Linear", "PeqaConfig", "PeqaLayer", "PeqaModel"]
