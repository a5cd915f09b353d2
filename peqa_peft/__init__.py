"""peqa_peft: quantization-aware fine-tuning methods (PEQA, QFT) as first-class PEFT methods.

Importing the package registers the new PEFT types, after which ``peft.get_peft_model``,
``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM`` and ``push_to_hub`` work with them unchanged::

    import peqa_peft
    from peft import get_peft_model
    model = get_peft_model(model, peqa_peft.PeqaConfig(bits=4, task_type="CAUSAL_LM"))
"""

from .peft_integration import add_peft_type, patch_peft_model

add_peft_type("PEQA")
add_peft_type("QFT")
patch_peft_model()

from .optim import IntLion  # noqa: E402
from .quant import QuantLinear, compute_qparams, fake_quantize, pack_bits, unpack_bits  # noqa: E402
from .quant.hf_quantizer import PeqaQuantizationConfig  # noqa: E402
from .quant.hf_quantizer import register as _register_quantizer  # noqa: E402
from .tuners import PeqaConfig, PeqaModel, QftConfig, QftModel  # noqa: E402
from .tuners.peqa.backends.compressed_tensors import install_compat_fixes  # noqa: E402

# transformers 5.2x + compressed-tensors 0.20 cannot load asymmetric pack-quantized checkpoints by default; see there.
install_compat_fixes()
# from_pretrained(..., quantization_config=PeqaQuantizationConfig(bits=4)) quantizes while loading
_register_quantizer()
from .integrations.formats.gguf.reader import load_gguf, load_gguf_tokenizer  # noqa: E402
from .utils import quantized_layer_bytes  # noqa: E402

__version__ = "0.1.0"

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
