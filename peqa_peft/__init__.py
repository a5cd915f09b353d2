"""peqa_peft: quantization-aware fine-tuning methods (PEQA, QFT) as first-class PEFT methods.

Importing the package registers the new PEFT types, after which ``peft.get_peft_model``,
``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM`` and ``push_to_hub`` work with them unchanged::

    import peqa_peft
    from peft import get_peft_model
    model = get_peft_model(model, peqa_peft.PeqaConfig(bits=4, task_type="CAUSAL_LM"))
"""

from . import _deprecated

_deprecated.install()

from .integrations.peft.registration import add_peft_type, patch_peft_model  # noqa: E402

add_peft_type("PEQA")
add_peft_type("QFT")
patch_peft_model()

from .core import QuantLinear, compute_qparams, fake_quantize, pack_bits, unpack_bits  # noqa: E402
from .integrations import distributed as _distributed  # noqa: E402,F401  (registers DDP/FSDP2 hooks)
from .integrations.formats.compressed_tensors.reader import install_compat_fixes  # noqa: E402
from .integrations.transformers.quantizer import PeqaQuantizationConfig  # noqa: E402
from .integrations.transformers.quantizer import register as _register_quantizer  # noqa: E402
from .optim import IntLion  # noqa: E402
from .tuners import PeqaConfig, PeqaModel, QftConfig, QftModel  # noqa: E402

# transformers 5.2x + compressed-tensors 0.20 cannot load asymmetric pack-quantized checkpoints by default; see there.
install_compat_fixes()
# from_pretrained(..., quantization_config=PeqaQuantizationConfig(bits=4)) quantizes while loading
_register_quantizer()
from ._version import __version__  # noqa: E402
from .core.layer_memory import quantized_layer_bytes  # noqa: E402
from .integrations.formats.gguf.reader import load_gguf, load_gguf_tokenizer  # noqa: E402

__all__ = [
    "IntLion",
    "PeqaConfig",
    "PeqaModel",
    "PeqaQuantizationConfig",
    "QftConfig",
    "QftModel",
    "QuantLinear",
    "__version__",
    "compute_qparams",
    "fake_quantize",
    "load_gguf",
    "load_gguf_tokenizer",
    "pack_bits",
    "quantized_layer_bytes",
    "unpack_bits",
]
