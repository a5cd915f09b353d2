"""QFT: Quantized Full-parameter Tuning (integer weights trained in place by an integer Lion optimizer)."""

from ...core.qft.dispatch import allow_dense_fallback
from ...core.qft.embedding import qft_embedding
from ...core.qft.int8_grad import Int8Grad
from ...core.qft.linear import qft_linear
from ...core.qft.weight import QftWeight
from ...integrations.peft.registration import register_method
from .config import QftConfig
from .layer import Embedding, Linear, QftLayer
from .model import QftModel

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
