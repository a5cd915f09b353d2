"""Loading base models for the workflows (shared by training and evaluation, so neither imports the other)."""

from __future__ import annotations

import torch


def load_nf4_model(name: str, dtype: torch.dtype = torch.float32):
    """``name`` with its linear layers in bitsandbytes NF4 (the QLoRA base), runnable on CPU and CUDA."""
    from transformers import AutoModelForCausalLM

    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ValueError("QLoRA / NF4 needs bitsandbytes: pip install 'peqa-peft[bnb]'") from err
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, quantization_config=quant)
    if not torch.cuda.is_available():
        # bitsandbytes' AVX512-BF16 CPU kernel asserts out_features % 32 == 0 (fails e.g. on 688-wide MLPs); its
        # generic dequantize path has no such limit.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model


__all__ = ["load_nf4_model"]
