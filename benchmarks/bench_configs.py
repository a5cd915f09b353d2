"""The benchmarked configurations: how each one builds its model, optimizer and deployable model.

Each :class:`Spec` names a configuration; ``spec.skip_reason(ctx)`` says why it cannot run here (a missing optional
package, a missing API, a GPU-only feature) and ``spec.build(ctx)`` returns a :class:`Built` ready to train. All
configurations start from the same pretrained float32 checkpoint and see the same batches.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from transformers import AutoModelForCausalLM

import peqa_peft  # noqa: F401  (registers the PEQA/QFT PEFT types)

# Default learning rates per optimizer family, chosen for a short run (dozens of steps): Adam-type optimizers on
# adapters move fast, full fine-tuning needs small steps, Lion-type (sign) updates want ~3-10x less than AdamW.
DEFAULT_LR = {"peqa": 2e-4, "lora": 5e-4, "full_adam": 3e-5, "full_lion": 1e-5, "qft": 1e-5}


@dataclass
class Context:
    """What every configuration shares: model, device, hyper-parameters."""

    model_path: str
    device: torch.device
    group_size: Optional[int]
    lr: dict[str, float]
    lora_rank: int = 8
    group_note: str = ""


@dataclass
class Built:
    """A configuration ready to train.

    ``deploy(model)`` turns the trained model into what one would ship (merged PEQA, merged LoRA, ...);
    ``peft_adapters`` says whether ``save_pretrained``/``load_adapter``/``set_adapter`` apply (for task switching).
    """

    model: nn.Module
    optimizer: Optional[torch.optim.Optimizer]
    deploy: Callable[[nn.Module], nn.Module]
    peft_adapters: bool = False
    notes: list[str] = field(default_factory=list)
    quantize_s: Optional[float] = None  # seconds spent quantizing (wrapping) the linear weights
    quantized_weights: Optional[int] = None  # how many weights that quantized


@dataclass(frozen=True)
class Spec:
    name: str
    label: str
    family: str  # "ref", "peqa", "lora", "qft", "full": grouping in the report
    build: Callable[[Context, Spec], Built]
    params: dict[str, Any] = field(default_factory=dict)
    requires: tuple[str, ...] = ()  # importable modules this configuration needs
    trains: bool = True

    def skip_reason(self, ctx: Context) -> Optional[str]:
        """Why this configuration cannot run in this environment, or ``None``."""
        for module in self.requires:
            try:
                importlib.import_module(module)
            except Exception as exc:  # ImportError, or a broken optional backend raising something else
                return f"`import {module}` failed: {type(exc).__name__}: {str(exc)[:120]}"
        if self.family == "qft" and not hasattr(peqa_peft, "QftConfig"):
            return "peqa_peft has no QftConfig yet (QFT not merged)"
        if self.family == "qft" and not hasattr(peqa_peft, "IntLion"):
            return "peqa_peft has no IntLion yet"
        if self.params.get("cuda_only") and ctx.device.type != "cuda":
            return "needs CUDA"
        return None


# ---------------------------------------------------------------- helpers


def load_base(ctx: Context, **kwargs: Any) -> nn.Module:
    """The pretrained checkpoint in float32 on ``ctx.device``."""
    model = AutoModelForCausalLM.from_pretrained(ctx.model_path, dtype=torch.float32, **kwargs)
    return model if "quantization_config" in kwargs else model.to(ctx.device)


def linear_names(model: nn.Module, include_head: bool) -> list[str]:
    """Leaf names of the model's ``nn.Linear`` layers (``q_proj``, ..., optionally ``lm_head``)."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    return sorted(names if include_head else names - {"lm_head"})


def pick_group_size(model: nn.Module, wanted: int) -> tuple[int, str]:
    """``wanted`` if it divides every quantized layer's ``in_features``, else the largest power of two that does.

    PEQA refuses a group size that does not divide a layer (by design); the demo model's ``down_proj`` has 688
    inputs, which 128 does not divide, so the grouped rows fall back to 16 there and the report says so.
    """
    ins = {m.in_features for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n}
    group = wanted
    while group > 1 and any(i % group for i in ins):
        group //= 2
    note = "" if group == wanted else f"group {wanted} does not divide in_features {sorted(ins)}; used {group}"
    return group, note


def _linear_numel(model: nn.Module, include_head: bool) -> int:
    """Weights of the ``nn.Linear`` layers (optionally without ``lm_head``): what a quantizing wrapper converts."""
    return sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and (include_head or "lm_head" not in n)
    )


def _timed_wrap(model: nn.Module, config, include_head: bool) -> tuple[nn.Module, float, int]:
    """``get_peft_model(model, config)`` with its wall time and the number of linear weights it quantized."""
    from peft import get_peft_model

    numel = _linear_numel(model, include_head)
    start = time.perf_counter()
    wrapped = get_peft_model(model, config)
    return wrapped, time.perf_counter() - start, numel


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _adamw(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(_trainable(model), lr=lr, weight_decay=0.0)


def _merge(model: nn.Module) -> nn.Module:
    return model.merge_and_unload()


# ---------------------------------------------------------------- builders


def build_reference(ctx: Context, spec: Spec) -> Built:
    """The untouched float32 model: reference perplexity, generation speed and bytes."""
    model = load_base(ctx)
    model.requires_grad_(False)
    return Built(model, None, deploy=lambda m: m, notes=["no training"])


def build_peqa(ctx: Context, spec: Spec) -> Built:
    from peqa_peft import PeqaConfig

    group = ctx.group_size if spec.params.get("grouped") else None
    config = PeqaConfig(bits=spec.params["bits"], group_size=group, target_modules="all-linear", task_type="CAUSAL_LM")
    model, seconds, numel = _timed_wrap(load_base(ctx), config, include_head=False)
    notes = [ctx.group_note] if group and ctx.group_note else []
    optimizer = _adamw(model, ctx.lr["peqa"])
    return Built(model, optimizer, _merge, True, notes, quantize_s=seconds, quantized_weights=numel)


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def build_lora(ctx: Context, spec: Spec) -> Built:
    from peft import get_peft_model

    model = load_base(ctx)
    notes = []
    if spec.params.get("rtn_bits"):
        _fake_quantize_linears(model, spec.params["rtn_bits"])
        notes.append(f"RTN {spec.params['rtn_bits']}-bit weights simulated (held dequantized in fp32)")
    model = get_peft_model(model, _lora_config())
    return Built(model, _adamw(model, ctx.lr["lora"]), deploy=_merge, peft_adapters=True, notes=notes)


@torch.no_grad()
def _fake_quantize_linears(model: nn.Module, bits: int) -> None:
    """Round-to-nearest (min-max) ``bits``-bit weights per output channel, in place (the RTN + LoRA baseline)."""
    from peqa_peft import fake_quantize

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and "lm_head" not in name:
            module.weight.copy_(fake_quantize(module.weight, bits, None, method="minmax"))


def build_qlora(ctx: Context, spec: Spec) -> Built:
    import bitsandbytes as bnb
    from peft import get_peft_model
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    start = time.perf_counter()
    base = load_base(ctx, quantization_config=quant, device_map={"": str(ctx.device)})
    seconds = time.perf_counter() - start  # bitsandbytes quantizes while loading: includes reading the checkpoint
    numel = sum(m.weight.numel() for m in base.modules() if isinstance(m, bnb.nn.Linear4bit))
    notes = []
    if ctx.device.type == "cpu":
        # bitsandbytes 0.50.2 repacks 4-bit weights for its AVX512-BF16 CPU kernel in eval mode and asserts
        # out_features % 32 == 0 (the demo model's 688 fails); its generic dequantize path has no such limit.
        for module in base.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
        notes.append("bnb AVX512-BF16 CPU kernel off (needs out_features % 32 == 0)")
    model = get_peft_model(base, _lora_config())
    # Paged optimizers page their states through CUDA unified memory; on CPU there is nothing to page to.
    opt_cls = bnb.optim.PagedAdamW8bit if ctx.device.type == "cuda" else bnb.optim.AdamW8bit
    notes.append(f"{opt_cls.__name__}; LoRA merged into nf4 for deployment")
    optimizer = opt_cls(_trainable(model), lr=ctx.lr["lora"], weight_decay=0.0)
    return Built(model, optimizer, _merge, True, notes, quantize_s=seconds, quantized_weights=numel)


def build_qft(ctx: Context, spec: Spec) -> Built:
    from peqa_peft import IntLion, QftConfig
    from peqa_peft.tuners.qft import QftWeight

    base = load_base(ctx)
    # QftConfig's default: every parameter trained, as in full fine-tuning (linears, embeddings and output head as
    # integer weights, norms in float).
    model, seconds, _ = _timed_wrap(base, QftConfig(task_type="CAUSAL_LM"), include_head=True)
    numel = sum(p.numel() for p in model.parameters() if isinstance(p, QftWeight))
    fused = bool(spec.params.get("fused"))
    optimizer = IntLion.from_model(model, lr=ctx.lr["qft"], betas=(0.9, 0.99), fused=fused)
    notes = ["int8 + 1% fp outliers, int8 grads; every parameter trained (norms in float)"]
    return Built(model, optimizer, lambda m: m, notes=notes, quantize_s=seconds, quantized_weights=numel)


def build_full(ctx: Context, spec: Spec) -> Built:
    model = load_base(ctx)
    model.requires_grad_(True)
    params = _trainable(model)
    kind = spec.params["optim"]
    if kind == "torch_adamw":
        optimizer = torch.optim.AdamW(params, lr=ctx.lr["full_adam"], weight_decay=0.0)
    elif kind.startswith("bnb_"):
        import bitsandbytes as bnb

        cls = {"bnb_lion8": bnb.optim.Lion8bit, "bnb_adamw8": bnb.optim.AdamW8bit}[kind]
        lr = ctx.lr["full_lion"] if "lion" in kind else ctx.lr["full_adam"]
        optimizer = cls(params, lr=lr, weight_decay=0.0)
    else:
        from torchao.optim import AdamW4bit, AdamW8bit

        cls = {"ao_adamw8": AdamW8bit, "ao_adamw4": AdamW4bit}[kind]
        optimizer = cls(params, lr=ctx.lr["full_adam"], weight_decay=0.0)
    notes = [] if kind == "torch_adamw" else ["tensors under 4096 entries keep 32-bit states"]
    return Built(model, optimizer, deploy=lambda m: m, notes=notes)


_BNB = ("bitsandbytes",)


def all_specs() -> list[Spec]:
    """Every configuration, in report order (LoRA-on-fp first: the speed reference)."""
    return [
        Spec("lora_fp", "LoRA r8 (fp32 base, AdamW)", "lora", build_lora),
        Spec("fp_ref", "fp32 model, no tuning", "ref", build_reference, trains=False),
        Spec("peqa4", "PEQA 4-bit per-channel", "peqa", build_peqa, {"bits": 4}),
        Spec("peqa4_g", "PEQA 4-bit grouped", "peqa", build_peqa, {"bits": 4, "grouped": True}),
        Spec("peqa3", "PEQA 3-bit per-channel", "peqa", build_peqa, {"bits": 3}),
        Spec("peqa3_g", "PEQA 3-bit grouped", "peqa", build_peqa, {"bits": 3, "grouped": True}),
        Spec("rtn3_lora", "RTN 3-bit + LoRA r8", "lora", build_lora, {"rtn_bits": 3}),
        Spec("qlora_nf4", "QLoRA r8 (nf4 base, 8-bit AdamW)", "lora", build_qlora, requires=("bitsandbytes",)),
        Spec("qft", "QFT + IntLion (standard)", "qft", build_qft),
        Spec("qft_fused", "QFT + IntLion (fused)", "qft", build_qft, {"fused": True}),
        Spec("full_adamw", "Full FT, fp32 AdamW", "full", build_full, {"optim": "torch_adamw"}),
        Spec("full_bnb_lion8", "Full FT, bnb Lion8bit", "full", build_full, {"optim": "bnb_lion8"}, _BNB),
        Spec("full_bnb_adamw8", "Full FT, bnb AdamW8bit", "full", build_full, {"optim": "bnb_adamw8"}, _BNB),
        Spec("full_ao_adamw8", "Full FT, torchao AdamW8bit", "full", build_full, {"optim": "ao_adamw8"}, ("torchao",)),
        Spec("full_ao_adamw4", "Full FT, torchao AdamW4bit", "full", build_full, {"optim": "ao_adamw4"}, ("torchao",)),
    ]
