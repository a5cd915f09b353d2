"""Fine-tune a causal LM on Alpaca with TRL's ``SFTTrainer`` using PEQA, QFT, LoRA or QLoRA.

Library entry point: :func:`train` with a :class:`TrainConfig`; command line: ``peqa-peft train`` (see ``cli.py``).
Every check that can fail (method, files, dataset columns, sequence length, linear layers) runs before the model
weights are loaded or any training starts.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..core.layer_memory import module_resident_bytes
from ..integrations.outputs import check_output_path, remove_created_dirs_on_failure
from .data import load_instruction_dataset, looks_like_local_path
from .models import load_nf4_model

METHODS = ("peqa", "qft", "lora", "qlora")
# Defaults per method: PEQA scales and LoRA factors take AdamW at a LoRA-like rate. QFT's recipe (IntLion moves every
# weight by lr per step): betas QFT_BETAS and linear decay after a 10% warm-up from benchmarks/qft_quality.py's sweep
# on the demo model, whose best lr was 3e-4; on the real SmolLM2-135M (30 Alpaca steps, benchmarks/real_models.py)
# 3e-4 made WikiText-2 perplexity worse than the untuned model (33.08 vs 30.64) while 1e-4 gave the best row of the
# table (29.61), so the default is 1e-4.
DEFAULT_LR = {"peqa": 2e-4, "qft": 1e-4, "lora": 2e-4, "qlora": 2e-4}
# AdamW moves each trained scale delta by about the learning rate per step, in the units of the scales, and base
# scales differ by model (median |s0|: demo 0.0093, SmolLM2-135M 0.051, Gemma 3 270M 0.0047 for its GGUF codes and
# 0.0084 re-quantized). Measured on the real models (benchmarks/real_models.py): 0.4% of the median scale per step
# trains SmolLM2 (the default 2e-4) and Gemma (2e-5: 63.7 -> 60.8 / 60.4 after 10 steps), while on Gemma 2.4% made it
# worse (63.2 -> 78.8) and 4.2% diverged (-> 380). So PEQA's default is 2e-4 or PEQA_SUGGESTED_RELATIVE_LR of the
# median scale, whichever is smaller, and a learning rate the user set above PEQA_MAX_RELATIVE_LR draws a warning.
PEQA_MAX_RELATIVE_LR = 0.01
PEQA_SUGGESTED_RELATIVE_LR = 0.004
# IntLion moves every weight by about the learning rate per step, so QFT's rate is relative to the weights (median
# |w| of the linear layers: SmolLM2-135M 0.12, Gemma 3 270M 0.017, demo 0.019). Measured (10/30 Alpaca steps):
# SmolLM2 trains at 1e-4 (0.08%) and gets worse at 3e-4 (0.25%); Gemma gets +14% WikiText-2 perplexity at 1e-4
# (0.58%) and improves at 3e-5 (0.17%: 63.7 -> 61.0). QFT's default is 1e-4 or QFT_SUGGESTED_RELATIVE_LR of the
# median |w|, whichever is smaller; a rate the user set above QFT_MAX_RELATIVE_LR draws a warning.
QFT_MAX_RELATIVE_LR = 0.002
QFT_SUGGESTED_RELATIVE_LR = 0.001
QFT_BETAS = (0.7, 0.8)  # shorter momentum than the Lion paper's (0.9, 0.99): best for float Lion and IntLion alike
QFT_WARMUP = 0.1  # fraction of the steps; Trainer's default schedule (linear decay) follows it
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class TrainConfig:
    """Options of :func:`train` (the ``peqa-peft train`` flags have the same names with dashes)."""

    model: str
    method: str = "peqa"
    output_dir: str = "outputs/run"
    dataset: Optional[str] = None
    max_samples: Optional[int] = None
    bits: int = 4
    group_size: Optional[Union[int, str]] = "auto"  # PeqaConfig's default (see there)
    target_modules: Union[str, list[str]] = "all-linear"
    qft_linear_only: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    max_steps: int = -1
    num_epochs: float = 1.0
    learning_rate: Optional[float] = None
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 512
    seed: int = 42
    bf16: bool = False
    logging_steps: int = 10
    save_steps: int = 0
    resume_from_checkpoint: Optional[str] = None
    push_to_hub: Optional[str] = None
    eval_datasets: list[str] = field(default_factory=list)
    eval_max_tokens: Optional[int] = None
    eval_data_dir: Optional[str] = None
    progress: bool = True
    learning_rate_is_default: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.max_steps == 0 or self.batch_size < 1 or self.grad_accum < 1 or self.seq_len < 2:
            raise ValueError("need max_steps != 0, batch_size >= 1, grad_accum >= 1 and seq_len >= 2")
        if self.learning_rate is None:
            self.learning_rate = DEFAULT_LR[self.method]
            self.learning_rate_is_default = True
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if looks_like_local_path(self.model) and not Path(self.model).expanduser().exists():
            raise FileNotFoundError(f"model directory {self.model} does not exist")
        checkpoint = self.resume_from_checkpoint
        if checkpoint not in (None, "last") and not Path(checkpoint).exists():
            raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")


def check_model_config(model_config, seq_len: int) -> None:
    """Refuse a sequence length beyond the model's context before loading any weights."""
    max_pos = getattr(model_config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise ValueError(f"seq_len={seq_len} exceeds the model's context length (max_position_embeddings={max_pos})")


def check_output_dir(path: str) -> None:
    """Refuse an output directory that is a file or cannot be created/written, before any model is loaded.

    Nothing is created here, so a run refused later for another reason leaves no directory behind (and
    :func:`train` removes the directories a failed run created).
    """
    check_output_path(path)


def is_complete_checkpoint(path: Path) -> bool:
    """Trainer writes ``trainer_state.json`` after the weights and optimizer: a checkpoint without it was cut off."""
    weights = ("adapter_model.safetensors", "model.safetensors", "pytorch_model.bin")
    return (path / "trainer_state.json").is_file() and any((path / w).is_file() for w in weights)


def resolve_checkpoint(checkpoint: Optional[str], output_dir: str) -> Optional[str]:
    """The checkpoint to resume from: ``"last"`` is the newest *complete* ``checkpoint-N`` in ``output_dir``."""
    if checkpoint != "last":
        if checkpoint is not None and not is_complete_checkpoint(Path(checkpoint)):
            raise ValueError(f"checkpoint {checkpoint} is incomplete (no trainer_state.json or weights)")
        return checkpoint
    candidates = sorted(
        (p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    for path in candidates:
        if is_complete_checkpoint(path):
            return str(path)
        print(f"peqa-peft: skipping incomplete checkpoint {path} (interrupted save)", file=sys.stderr)
    raise ValueError(f"--resume-from-checkpoint last: no complete checkpoint-N directory in {output_dir}")


def check_has_linear_layers(model: nn.Module) -> None:
    from transformers.pytorch_utils import Conv1D

    if not any(isinstance(m, (nn.Linear, Conv1D)) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} has no nn.Linear/Conv1D layers to quantize or adapt")


def load_base_model(name: str, method: str, bf16: bool):
    """The base model to train, on the bitsandbytes 4-bit backend for QLoRA."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if bf16 else torch.float32
    if method != "qlora":
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(load_nf4_model(name, dtype), use_gradient_checkpointing=False)


def cast_keeping_trainable_fp32(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the frozen float weights to ``dtype``; trainable parameters stay float32 (the optimizer's master copy).

    Quantized layers keep their codes and float32 scales whatever the cast (``QuantLinear._apply``).
    """
    model.to(dtype)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def peft_config_for(cfg: TrainConfig):
    """The PEFT config of the chosen method."""
    from peft import LoraConfig

    from ..tuners import PeqaConfig

    common = dict(target_modules=cfg.target_modules, task_type="CAUSAL_LM")
    if cfg.method == "peqa":
        return PeqaConfig(bits=cfg.bits, group_size=cfg.group_size, **common)
    if cfg.method == "qft":
        from ..tuners import QftConfig

        # Every parameter trains (QftConfig's full_parameter default) unless --qft-linear-only. TRL's SFTTrainer
        # computes the loss from lm_head.weight directly (a fused LM head) and refuses a PEFT layer there, so the
        # output head trains as a float parameter here; every other weight is an integer weight. A head tied to the
        # embeddings keeps them float too (one float weight; QftConfig.tied_embeddings records it).
        return QftConfig(full_parameter=not cfg.qft_linear_only, exclude_modules=["lm_head"], **common)
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, **common)


def optimizer_for(cfg: TrainConfig) -> dict[str, Any]:
    """Trainer arguments selecting the optimizer: IntLion for QFT, AdamW (8-bit paged on CUDA for QLoRA) else."""
    if cfg.method == "qft":
        from ..optim import IntLion

        return {"optimizer_cls_and_kwargs": IntLion.trainer_factory(lr=cfg.learning_rate, betas=QFT_BETAS)}
    if cfg.method == "qlora" and torch.cuda.is_available():
        return {"optim": "paged_adamw_8bit"}
    return {"optim": "adamw_torch"}


def build_trainer(cfg: TrainConfig, model, tokenizer, dataset):
    from trl import SFTConfig, SFTTrainer

    optim = optimizer_for(cfg)
    args = SFTConfig(
        output_dir=cfg.output_dir,
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.num_epochs,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        max_length=cfg.seq_len,
        seed=cfg.seed,
        bf16=cfg.bf16,
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not cfg.progress,
        completion_only_loss=True,
        warmup_steps=QFT_WARMUP if cfg.method == "qft" else 0,
        optim=optim.get("optim", "adamw_torch"),
    )
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        optimizer_cls_and_kwargs=optim.get("optimizer_cls_and_kwargs"),
    )


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` with ``cfg.method`` and write the adapter into ``cfg.output_dir``.

    Returns the run summary (also written to ``train_summary.json``): trainable parameters, resident model bytes,
    adapter size, final training loss, steps, time, and perplexities when ``eval_datasets`` is set. A run that fails
    removes the output directories it created while they hold no file.
    """
    import peqa_peft  # noqa: F401  (registers the PEFT types)

    start = time.time()
    check_output_dir(cfg.output_dir)
    with remove_created_dirs_on_failure(cfg.output_dir):
        return _train(cfg, start)


def _train(cfg: TrainConfig, start: float) -> dict[str, Any]:
    from peft import get_peft_model
    from transformers import AutoConfig, AutoTokenizer, set_seed

    from .model_zoo import gguf_file

    checkpoint = resolve_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir)
    gguf = gguf_file(cfg.model)  # a .gguf file or zoo name: loaded with load_gguf, its own blocks adopted
    if gguf is not None and cfg.method == "qlora":
        raise ValueError("--method qlora re-quantizes a float model to NF4; use --method peqa/lora with a GGUF file")
    if gguf is None:
        check_model_config(AutoConfig.from_pretrained(cfg.model), cfg.seq_len)
    dataset = load_instruction_dataset(cfg.dataset, max_samples=cfg.max_samples, seed=cfg.seed)
    peft_config = peft_config_for(cfg)
    if gguf is not None and cfg.method == "peqa":
        peft_config.adopt_checkpoint_grid = True  # the file's layers keep their own grid (e.g. Q4_K_M's mix)
    if gguf is not None:
        from ..integrations.formats.gguf.reader import load_gguf, load_gguf_config, load_gguf_tokenizer

        check_model_config(load_gguf_config(gguf), cfg.seq_len)
        tokenizer = load_gguf_tokenizer(gguf)
    else:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    set_seed(cfg.seed)
    # PEQA quantizes the weights as stored (float32 for most checkpoints), not a bf16 rounding of them: the codes, and
    # so the adapter's base fingerprint, are then the same whatever dtype the model is trained or evaluated in.
    quantize_as_stored = cfg.method == "peqa" and cfg.bf16
    if gguf is not None:
        base = load_gguf(gguf, torch.bfloat16 if cfg.bf16 and not quantize_as_stored else torch.float32)
    else:
        base = load_base_model(cfg.model, cfg.method, cfg.bf16 and not quantize_as_stored)
    check_has_linear_layers(base)
    model = get_peft_model(base, peft_config)
    _log_tied_embeddings(model)
    fit_learning_rate(model, cfg)
    if quantize_as_stored:
        cast_keeping_trainable_fp32(model, torch.bfloat16)
    trainer = build_trainer(cfg, model, tokenizer, dataset)
    if len(trainer.train_dataset) == 0:
        raise ValueError(
            f"no training example keeps a response token within seq_len={cfg.seq_len} (the prompts are longer); "
            "raise --seq-len"
        )
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(cfg.output_dir)
    summary = _summary(cfg, model, result, time.time() - start)
    if cfg.eval_datasets:
        summary["eval"] = evaluate_datasets(model, tokenizer, cfg)
    _write_outputs(cfg, model, summary)
    if cfg.push_to_hub:
        from ..integrations.hub import push_folder_to_hub

        summary["hub_commit"] = str(push_folder_to_hub(cfg.output_dir, cfg.push_to_hub))
    return summary


def fit_learning_rate(model, cfg: TrainConfig) -> None:
    """Relate ``cfg.learning_rate`` to the size of what the method moves and say so in one line: PEQA's AdamW moves
    each scale, QFT's IntLion each weight, by about the learning rate per step, and both differ tenfold between
    models. The default rate becomes the suggested fraction of the median size where that is smaller (e.g. Gemma 3
    270M: PEQA 2e-4 -> 1.9e-5); a rate the user set is kept, with a warning above the maximum fraction. Other
    methods, and models without quantized layers, are left as they are."""
    if cfg.method not in _LR_RULES:
        return
    what, measure, suggested_ratio, max_ratio = _LR_RULES[cfg.method]
    median = measure(model)
    if median is None:
        return
    suggested = float(f"{suggested_ratio * median:.2g}")
    if cfg.learning_rate_is_default and suggested < cfg.learning_rate:
        print(
            f"peqa-peft: learning rate {suggested:g} ({suggested_ratio:.1%} of this model's median {what} "
            f"{median:.3g}) instead of the default {cfg.learning_rate:g}, which is "
            f"{cfg.learning_rate / median:.1%} of it; set --lr to choose",
            file=sys.stderr,
        )
        cfg.learning_rate = suggested
        return
    ratio = cfg.learning_rate / median
    print(
        f"peqa-peft: learning rate {cfg.learning_rate:g} = {ratio:.2%} of the median {what} ({median:.3g})",
        file=sys.stderr,
    )
    if ratio > max_ratio:
        warnings.warn(
            f"{cfg.method.upper()} learning rate {cfg.learning_rate:g} is {ratio:.2%} of this model's median {what} "
            f"({median:.3g}): each step can move it by about that much, which made Gemma 3 270M worse or diverge "
            f"(see the command-line guide). Consider a learning rate of {suggested:g} (--lr; {suggested_ratio:.1%} "
            f"of the median {what}).",
            stacklevel=2,
        )


def _median_scale(model) -> Optional[float]:
    """Median |s0| of the PEQA base layers (None without any)."""
    from ..core import QuantLinear

    scales = [m.scale.detach().abs().flatten().float() for m in model.modules() if isinstance(m, QuantLinear)]
    return torch.cat(scales).median().item() if scales else None


def _median_qft_weight(model, rows: int = 64) -> Optional[float]:
    """Median |w| of QFT's integer weights, from their first ``rows`` rows each (no weight-sized float copy)."""
    from ..core.qft.weight import QftWeight

    weights = [p for p in model.parameters() if isinstance(p, QftWeight)]
    if not weights:
        return None
    with torch.no_grad():
        sample = [w.dequantize_rows(0, min(rows, w.shape[0]), torch.float32).abs().flatten() for w in weights]
    return torch.cat(sample).median().item()


# method -> (what its optimizer moves, its median size in a model, suggested and largest learning rate per size)
_LR_RULES = {
    "peqa": ("base scale", _median_scale, PEQA_SUGGESTED_RELATIVE_LR, PEQA_MAX_RELATIVE_LR),
    "qft": ("|weight|", _median_qft_weight, QFT_SUGGESTED_RELATIVE_LR, QFT_MAX_RELATIVE_LR),
}


def _log_tied_embeddings(model) -> None:
    """The one line saying what QFT made of a tied embedding pair (the CLI's log is stderr)."""
    from ..tuners.qft.model import tied_embeddings_note

    config = model.peft_config[model.active_adapter]
    note = tied_embeddings_note(config) if hasattr(config, "tied_embeddings") else None
    if note:
        print(f"peqa-peft: {note}", file=sys.stderr)


def evaluate_datasets(model, tokenizer, cfg: TrainConfig) -> dict[str, dict]:
    from .evaluate import load_eval_text, perplexity

    results = {}
    for name in cfg.eval_datasets:
        text = load_eval_text(name, cfg.eval_data_dir)
        seq_len = min(cfg.seq_len, getattr(model.config, "max_position_embeddings", cfg.seq_len))
        ids = tokenizer(text, return_tensors="pt").input_ids
        result = perplexity(
            model, input_ids=ids, seq_len=seq_len, max_tokens=cfg.eval_max_tokens, progress=cfg.progress
        )
        results[name] = result.to_dict()
    return results


def _summary(cfg: TrainConfig, model, result, seconds: float) -> dict[str, Any]:
    trainable, total = model.get_nb_trainable_parameters()
    adapter = Path(cfg.output_dir) / "adapter_model.safetensors"
    return {
        "method": cfg.method,
        "model": cfg.model,
        "dataset": cfg.dataset or "bundled alpaca_data_5000.json",
        "steps": result.global_step,
        "train_loss": result.training_loss,
        "trainable_params": trainable,
        "total_params": total,
        "resident_model_bytes": module_resident_bytes(model),
        "adapter_bytes": adapter.stat().st_size if adapter.exists() else None,
        "seconds": round(seconds, 1),
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("progress",)},
    }


def _write_outputs(cfg: TrainConfig, model, summary: dict) -> None:
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    with open(os.path.join(cfg.output_dir, "train_summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    from ..integrations.hub import add_training_section

    add_training_section(cfg.output_dir, summary)


def format_summary(summary: dict) -> str:
    """A short human-readable end-of-run report."""
    lines = [
        f"method            {summary['method']}",
        f"steps             {summary['steps']} (final train loss {summary['train_loss']:.4f})",
        f"trainable params  {summary['trainable_params']:,} of {summary['total_params']:,}",
        f"resident model    {summary['resident_model_bytes'] / 2**20:.2f} MiB",
    ]
    if summary.get("adapter_bytes") is not None:
        lines.append(f"adapter file      {summary['adapter_bytes'] / 1024:.1f} KiB")
    for name, res in summary.get("eval", {}).items():
        lines.append(f"{name:<17} perplexity {res['perplexity']:.3f} ({res['tokens']} tokens)")
    lines.append(f"time              {summary['seconds']} s")
    return "\n".join(lines)
