"""QFT: Quantized Full-parameter Tuning (integer weights trained in place by an integer Lion optimizer)."""

from ...peft_integration import register_method
from .config import QftConfig
from .embedding import qft_embedding
from .layer import Embedding, Linear, QftLayer
from .model import QftModel
from .tensor import Int8Grad, QftWeight, allow_dense_fallback, qft_linear

register_method("qft", QftConfig, QftModel)

__all__ = [
    "Embedding",
    "Int8Grad",
    "Linear",
    "QftConfig",
    "QftLayer",
    "QftModel",
    "QftWeight",
    "allow_dense_fallback",
    "qft_embedding",
    "qft_linear",
]
