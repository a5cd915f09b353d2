"""PEQA on real pretrained LLMs: initializer sweep and a fixed tuning budget, WikiText-2 / PTB test perplexity.

    python benchmarks/real_models.py --model smollm2-135m --configs '4-*-*'          # init sweep, 4-bit rows
    python benchmarks/real_models.py --model smollm2-135m --configs '' --rows peqa,lora,full --ptb

The models are the GGUF files of :mod:`peqa_peft.workflows.model_zoo`. The float reference ("fp32") is the GGUF
dequantized by transformers' own loader (``from_pretrained(dir, gguf_file=...)``), saved once as a plain float
checkpoint under ``outputs/realmodels/<model>-fp32`` so that ``peqa-peft eval/train --model <that dir>``
reproduce every row.

Caveat: those float weights are themselves 4-bit GGUF blocks of 32 inputs (Q4_1 for SmolLM2, Q4_K/Q6_K sub-blocks of
32 for Gemma 3). Re-quantizing at group 32 lines up with the file's own blocks and is optimistic; per channel, 128
and 64 do not line up. No float-only pretrained causal LM can be installed here, so this is the closest to a float
model we can measure.

Init sweep (``--configs``, ids ``<bits>-<group>-<init>``, shell-style patterns allowed, e.g. ``'4-*-*'``):
bits 4/3/2 x group ``ch`` (per output channel) / ``g128`` / ``g64`` / ``g32`` x init ``rtn`` (PEQA's
``init_method="minmax"``), ``mse`` (``"mse"``, the MSE grid search) or ``gptq`` (GPTQ, implemented here: Hessians of
every linear layer's inputs from one pass of the float model over ``--calib-windows`` x ``--seq-len`` tokens of
WikiText-2 *validation* (never the test split), each window's first token (the attention sink) weighted
``--gptq-sink-weight`` (16; plain GPTQ: 1, see :func:`collect_hessians`), then the GPTQ column-by-column solve with
1% dampening and a min-max grid per group found on the error-updated weights; its codes/scales/zero-points are
written into PEQA's quantized base) or ``fz`` (not a package initializer: min-max over each group's own range with a
*fractional* zero-point, ``s = (max - min) / (2^b - 1)``, ``z = -min / s`` -- the rule of GGUF's Q4_1 / Q5_1, which
PEQA's integer zero-point cannot hold; written into the base as a float zero-point, which PEQA layers accept. It
measures how much of a re-quantization's cost is the integer zero-point). ``--adopt DIR ...`` adds untuned rows
``adopt-<dir>``: compressed-tensors checkpoints of the fp32 model written by llm-compressor
(scripts/make_quantized_checkpoints.py, its own venv), adopted by PEQA in their own codes. A group size that does
not divide a layer's ``in_features`` (SmolLM2's 576-wide inputs at g128) uses the largest divisor of
``in_features`` below it that is a multiple of 32 (stated in the results as ``group_fallback``).

Tuning rows (``--rows``): the issue's fixed budget, ``--steps`` (30) Alpaca SFT steps, batch 4 x 256 tokens, the
CLI's defaults otherwise (``peqa_peft.workflows.train``'s TrainConfig/SFTTrainer, same seed and data order for every
row): ``peqa`` (the package's default 4-bit PEQA, ``group_size="auto"``, MSE init, on the float model), ``peqa3``
(3-bit at ``--peqa3-group``), ``lora`` (r8 on fp32), ``qlora`` (the CLI's method: NF4 base + LoRA r8), ``full`` (full
fine-tuning, AdamW lr ``--full-lr``), ``qft`` (the CLI's method, IntLion; ``--qft-lr`` makes it row
``tuned-qft-lr<lr>``; ``--peqa-lr`` likewise for the PEQA rows) and ``peqa-gguf`` (PEQA on the file itself:
``peqa_peft.load_gguf`` + ``PeqaConfig(adopt_checkpoint_grid=True)``, the file's codes and scales as the base, as
``peqa-peft train --model <file.gguf>`` does). Each tuned row records the mean loss of its first and last logged
steps and how many state-dict tensors training changed (a row that changed none raises). ``gguf-adopt`` is the
adopted file untuned. Perplexity is measured with the same windows as the sweep.

Under load, set ``OMP_NUM_THREADS=1``: with the 2 cores oversubscribed, every OpenMP parallel region of a 2-thread
torch waits for a descheduled thread (measured: the eager MSE search of a 192 x 576 layer 0.1-0.3 s at 1 thread,
1.2-8.5 s at 2). Each row records its thread count and the load average.

Results are appended to ``<output-dir>/results.json`` (rows already there are skipped unless ``--redo``) and
rendered into ``<output-dir>/results.md`` with the command and the machine.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BITS = (4, 3, 2)
GROUPS = ("ch", "g128", "g64", "g32")
INITS = ("rtn", "mse", "gptq", "fz")
ALL_CONFIGS = [f"{b}-{g}-{i}" for b in BITS for g in GROUPS for i in INITS]
ROWS = ("peqa", "peqa3", "lora", "qlora", "full", "qft", "peqa-gguf")


# ----------------------------------------------------------------------------------------------------------- models
def float_model_dir(name: str) -> Path:
    """The dequantized GGUF as a plain float32 checkpoint (written once, by transformers' own GGUF loader)."""
    from peqa_peft.workflows.model_zoo import load_dequantized

    out = REPO / "outputs" / "realmodels" / f"{name}-fp32"
    if (out / "config.json").exists():
        return out
    model, tokenizer = load_dequantized(name)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def group_size_for(group: str, in_features: int) -> int | None:
    """Group size for ``in_features`` inputs: the asked one, or the largest multiple-of-32 divisor below it."""
    if group == "ch":
        return None
    size = int(group[1:])
    if in_features % size == 0:
        return size
    for cand in range(size - 32, 31, -32):
        if in_features % cand == 0:
            return cand
    return None


def linear_names(model) -> dict[str, int]:
    """in_features of every linear layer PEQA targets by default (all but the output head)."""
    return {
        n: m.in_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    }


def peqa_model(fp_model, bits: int, group: str, method: str):
    """``get_peft_model`` with one PeqaConfig per distinct group size (a config takes one group size)."""
    from peft import get_peft_model

    from peqa_peft import PeqaConfig

    widths = linear_names(fp_model)
    sizes = {n: group_size_for(group, w) for n, w in widths.items()}
    main = group_size_for(group, max(widths.values(), key=list(widths.values()).count))
    fallback = {n: s for n, s in sizes.items() if s != main}
    model = copy.deepcopy(fp_model)
    if not fallback:
        return get_peft_model(model, PeqaConfig(bits=bits, group_size=main, init_method=method)), {}
    # Layers whose width the main group size does not divide: quantized with their fallback through PEQA's own
    # QuantLinear (the same code path), swapped in after get_peft_model created the adapters on the others.
    from peqa_peft.core import QuantLinear

    model = get_peft_model(
        model, PeqaConfig(bits=bits, group_size=main, init_method=method, exclude_modules=list(fallback))
    )
    for name, size in fallback.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule("base_model.model." + parent_name)
        setattr(parent, child, QuantLinear.from_linear(getattr(parent, child), bits, size, method=method))
    return model, {n: s for n, s in fallback.items()}


def fallback_note(fp_model, group: str, fallback: dict[str, int]) -> str:
    """Which group sizes the layers got, e.g. ``180 layers at g96, 30 at g128`` (SmolLM2 at g128)."""
    main = len(linear_names(fp_model)) - len(fallback)
    sizes = {n: group_size_for(group, w) for n, w in linear_names(fp_model).items() if n not in fallback}
    counts = [f"{main} layers at g{next(iter(set(sizes.values())))}"]
    counts += [f"{list(fallback.values()).count(v)} at g{v}" for v in sorted(set(fallback.values()))]
    return ", ".join(counts)


# ------------------------------------------------------------------------------------------------------------- GPTQ
@torch.no_grad()
def collect_hessians(fp_model, calib_ids: torch.Tensor, sink_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """``H = 2/n * sum_t w_t x_t x_t^T`` of every targeted linear layer's inputs over the calibration windows (float
    model), each window's first token weighted ``sink_weight`` and every other token 1.

    Why the weight: every window's first token is the attention sink of the layers above. Plain GPTQ (weight 1)
    counts it once per window, so its error is traded away for the others', and SmolLM2's perplexity got *worse*
    than RTN's although every layer's output error on held-out tokens was lower (docs/guides/real-models.md)."""
    names = linear_names(fp_model)
    hessians = {n: torch.zeros(w, w) for n, w in names.items()}
    counts = dict.fromkeys(names, 0.0)
    weights = torch.ones(calib_ids.shape[1])
    weights[0] = sink_weight
    hooks = []
    for name in names:

        def hook(module, args, _out, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).float() * weights.sqrt()[:, None]
            n_old, n_new = counts[name], counts[name] + weights.sum().item()
            hessians[name].mul_(n_old / n_new).addmm_(x.t(), x, alpha=2.0 / n_new)
            counts[name] = n_new

        hooks.append(fp_model.get_submodule(name).register_forward_hook(hook))
    try:
        for window in calib_ids:
            fp_model(input_ids=window[None])
    finally:
        for h in hooks:
            h.remove()
    return hessians


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None, damp=0.01):
    """GPTQ (Frantar et al. 2022): codes, scale, zero-point with PEQA's layout, min-max grid per group."""
    from peqa_peft.core.quantizer import compute_qparams

    w = weight.detach().float().clone()
    rows, cols = w.shape
    maxq = 2**bits - 1
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    g = group_size or cols
    block = cols if group_size is None else g * max(1, 128 // g)
    codes = torch.zeros(rows, cols, dtype=torch.uint8)
    scales = torch.zeros(rows, cols // g)
    zeros = torch.zeros(rows, cols // g)
    if group_size is None:
        s, z = compute_qparams(w, bits, None, "minmax")
        scales[:, 0], zeros[:, 0] = s[:, 0], z[:, 0]
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if group_size is not None and col % g == 0:
                s, z = compute_qparams(w1[:, i : i + g], bits, None, "minmax")
                scales[:, col // g], zeros[:, col // g] = s[:, 0], z[:, 0]
            s, z = scales[:, col // g], zeros[:, col // g]
            q = torch.clamp(torch.round(w1[:, i] / s) + z, 0, maxq)
            codes[:, col] = q.to(torch.uint8)
            err = (w1[:, i] - (q - z) * s) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes, scales, zeros


def install_gptq(model, fp_model, hessians, bits: int) -> None:
    """Overwrite each PEQA base layer's codes/scales/zero-points with GPTQ's (same grid layout, same bit width)."""
    from peqa_peft.core import QuantLinear
    from peqa_peft.core.packing import pack_bits

    for name in hessians:
        module = model.get_submodule("base_model.model." + name)
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if not isinstance(base, QuantLinear):
            raise TypeError(f"{name} is not quantized ({type(base).__name__})")
        codes, scale, zero = gptq_quantize(fp_model.get_submodule(name).weight, hessians[name], bits, base.group_size)
        base.qweight = pack_bits(codes, bits)
        base.scale = scale
        base.zero_point = zero.to(torch.uint8)


@torch.no_grad()
def fractional_zero_quantize(weight: torch.Tensor, bits: int, group_size: int | None):
    """Min-max codes over each group's own range with a fractional zero-point (GGUF Q4_1's rule, ``w = s*(q - z)``)."""
    w = weight.detach().float()
    groups = w.reshape(w.shape[0], -1, group_size or w.shape[1])
    lo, hi = groups.amin(-1), groups.amax(-1)
    maxq = 2**bits - 1
    scale = ((hi - lo) / maxq).clamp_min(torch.finfo(torch.float32).tiny)
    zero = -lo / scale
    codes = torch.clamp(torch.round(groups / scale.unsqueeze(-1) + zero.unsqueeze(-1)), 0, maxq)
    return codes.to(torch.uint8).reshape(w.shape), scale, zero


def install_fractional_zero(model, fp_model, bits: int) -> None:
    """Overwrite each PEQA base layer's codes/scales/zero-points with :func:`fractional_zero_quantize`'s."""
    from peqa_peft.core import QuantLinear
    from peqa_peft.core.packing import pack_bits

    for name in linear_names(fp_model):
        module = model.get_submodule("base_model.model." + name)
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if not isinstance(base, QuantLinear):
            raise TypeError(f"{name} is not quantized ({type(base).__name__})")
        codes, scale, zero = fractional_zero_quantize(fp_model.get_submodule(name).weight, bits, base.group_size)
        base.qweight = pack_bits(codes, bits)
        base.scale = scale
        base.zero_point = zero


@torch.no_grad()
def alignment_check(fp_model, bits: int = 4) -> dict:
    """How much the file's own 32-blocks flatter group 32: relative weight error of RTN with PEQA's groups aligned
    with the GGUF blocks, and with every row's columns rolled by 16 first (each PEQA group then straddles two
    blocks, as a g32 grid would on weights that were never GGUF-quantized), beside g64 and per channel."""
    from peqa_peft.core.quantizer import compute_qparams, dequantize, quantize

    def rel_err(w, group):
        s, z = compute_qparams(w, bits, group, "minmax")
        return (dequantize(quantize(w, s, z, bits, group), s, z, group) - w).pow(2).sum().item()

    total = dict.fromkeys(("g32_aligned", "g32_shifted16", "g64", "ch"), 0.0)
    norm = 0.0
    distinct = []
    for name in linear_names(fp_model):
        w = fp_model.get_submodule(name).weight.float()
        norm += w.pow(2).sum().item()
        total["g32_aligned"] += rel_err(w, 32)
        total["g32_shifted16"] += rel_err(torch.roll(w, 16, dims=1), 32)
        total["g64"] += rel_err(w, 64)
        total["ch"] += rel_err(w, None)
        blocks = w.reshape(-1, 32)[:256]
        distinct.append(sum(len(torch.unique(b)) for b in blocks) / len(blocks))
    result = {k: v / norm for k, v in total.items()}
    result["distinct_values_per_32_block"] = sum(distinct) / len(distinct)
    return result


# ---------------------------------------------------------------------------------------------------------- tuning
METHOD = {"peqa": "peqa", "peqa3": "peqa", "lora": "lora", "qlora": "qlora", "full": "lora", "qft": "qft"}
METHOD["peqa-gguf"] = "peqa"


def lr_override(row: str, args) -> float | None:
    """``--qft-lr`` / ``--peqa-lr`` for the rows they apply to (the row's key then names it), else ``None``."""
    return args.qft_lr if row == "qft" else (args.peqa_lr if METHOD[row] == "peqa" else None)


def train_config(row: str, model_dir: Path, args, out_dir: Path):
    """The issue's fixed budget (Alpaca SFT, ``--steps`` x 4 x 256, CLI defaults otherwise) for ``row``."""
    from peqa_peft.workflows.train import TrainConfig

    return TrainConfig(
        model=str(model_dir),
        method=METHOD[row],
        output_dir=str(REPO / "outputs" / "realmodels" / "runs" / out_dir.name / row),  # never under results/
        max_steps=args.steps,
        batch_size=4,
        seq_len=256,
        bits=3 if row == "peqa3" else 4,
        group_size=args.peqa3_group if row == "peqa3" else "auto",
        learning_rate=args.full_lr if row == "full" else lr_override(row, args),
        logging_steps=1,  # every step's loss, to check that the row trained
        progress=False,
    )


def tuning_model(row: str, cfg, args):
    """The model ``row`` trains: the float model itself (``full``), the GGUF file adopted with its own codes
    (``peqa-gguf``: ``peqa_peft.load_gguf`` + PeqaConfig(adopt_checkpoint_grid=True), as ``peqa-peft train --model
    <file.gguf>`` does), or ``get_peft_model`` of the CLI's base and config for the method."""
    from peft import get_peft_model

    from peqa_peft.workflows.train import load_base_model, peft_config_for

    if row == "peqa-gguf":
        from peqa_peft import load_gguf
        from peqa_peft.workflows.model_zoo import gguf_path

        config = peft_config_for(cfg)
        config.adopt_checkpoint_grid = True
        return get_peft_model(load_gguf(gguf_path(args.model)), config)
    base = load_base_model(cfg.model, cfg.method, False)
    return base if row == "full" else get_peft_model(base, peft_config_for(cfg))


def state_snapshot(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (codes, scales, adapters, integer QFT weights), copied."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def training_check(before: dict, model, log_history: list[dict]) -> dict:
    """Evidence that the row trained: the per-step loss at the start and end, and how many tensors changed.

    A row whose optimizer silently updated nothing would show ``tensors_changed=0``; the tuning rows raise then.
    """
    after = model.state_dict()
    changed = [k for k, v in before.items() if k in after and not torch.equal(v, after[k])]
    losses = [h["loss"] for h in log_history if "loss" in h]
    if not changed:
        raise RuntimeError("no parameter or buffer changed during training")
    k = max(1, min(5, len(losses) // 3))
    return {
        "loss_first": round(sum(losses[:k]) / k, 4) if losses else None,
        "loss_last": round(sum(losses[-k:]) / k, 4) if losses else None,
        "tensors_changed": f"{len(changed)}/{len(before)}",
    }


def tune(row: str, model_dir: Path, args, out_dir: Path):
    """Train ``row`` on the fixed budget; returns (model in eval mode, info for the results row)."""
    from transformers import AutoTokenizer, set_seed

    from peqa_peft.workflows.data import load_instruction_dataset
    from peqa_peft.workflows.train import build_trainer, fit_learning_rate

    cfg = train_config(row, model_dir, args, out_dir)
    dataset = load_instruction_dataset(cfg.dataset, max_samples=cfg.max_samples, seed=cfg.seed)
    # The float checkpoint's tokenizer for every row, peqa-gguf included: it is transformers' conversion of the
    # GGUF's own vocabulary, so the training and evaluation token ids are the same for every row.
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    set_seed(cfg.seed)
    model = tuning_model(row, cfg, args)
    fit_learning_rate(model, cfg)  # as `peqa-peft train` does: a default too large for this model is lowered
    before = state_snapshot(model)
    trainer = build_trainer(cfg, model, tokenizer, dataset)
    result = trainer.train()
    info = {"lr": cfg.learning_rate, "train_loss": round(result.training_loss, 4)}
    info.update(training_check(before, model, trainer.state.log_history))
    return model.eval(), info


def adopted_gguf(args):
    """``peqa_peft.load_gguf`` of the file itself, untuned (the adopted PEQA base: the file's codes and scales)."""
    from peqa_peft import load_gguf
    from peqa_peft.workflows.model_zoo import gguf_path

    return load_gguf(gguf_path(args.model)).eval(), {"source": gguf_path(args.model).name}


def adopted_checkpoint(directory: Path):
    """A compressed-tensors checkpoint (e.g. llm-compressor's GPTQ of the fp32 model, written by
    scripts/make_quantized_checkpoints.py in its own venv) loaded by transformers and adopted by PEQA in its own
    codes (``adopt_checkpoint_grid=True``), untuned."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from peqa_peft import PeqaConfig

    base = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model = get_peft_model(base, PeqaConfig(adopt_checkpoint_grid=True, task_type="CAUSAL_LM"))
    writer = directory / "writer.json"
    info = {"source": directory.name}
    if writer.is_file():
        meta = json.loads(writer.read_text())
        info.update(writer=f"llm-compressor {meta['versions']['llmcompressor']}", calibration=meta.get("calibration"))
    return model.eval(), info


# ---------------------------------------------------------------------------------------------------------- driver
def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
        amx = "amx_tile" in lscpu
    except (OSError, StopIteration):
        amx = False
    return f"{cpu}, AMX {'yes' if amx else 'no'}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def row_order(key: str) -> tuple:
    """Table order: fp32, the adopted GGUF, the init sweep (bits, group, init as in ALL_CONFIGS), the tuned rows."""
    if key in ("fp32", "gguf-adopt"):
        return (0, key != "fp32")
    if key in ALL_CONFIGS:
        return (1, ALL_CONFIGS.index(key))
    if key.startswith("adopt-"):  # checkpoints adopted untuned: after the sweep, before the tuned rows
        return (1, len(ALL_CONFIGS), key)
    name = key.removeprefix("tuned-")
    return (2, ROWS.index(name) if name in ROWS else len(ROWS), key)


def table_line(key: str, r: dict, fp: dict) -> str:
    if "error" in r:
        return f"| {key} | — | — | — | {r.get('seconds', 0):.0f} | {r['error']} |"
    ratio = r["wikitext2"] / fp["wikitext2"] if fp.get("wikitext2") else float("nan")
    ptb = f"{r['ptb']:.2f}" if r.get("ptb") else ""
    notes = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("wikitext2", "ptb", "seconds") and v)
    return f"| {key} | {r['wikitext2']:.2f} | {ratio:.3f} | {ptb} | {r['seconds']:.0f} | {notes} |"


def render(results: dict, path: Path) -> None:
    """results.md: the settings, machine and commands, then one table of every row."""
    rows = results["rows"]
    lines = [
        f"# {results['model']}: test perplexity ({results['max_tokens']} tokens, {results['seq_len']}-token windows)",
        "",
        f"Machine: {results['machine']}",
        "",
        "Commands:",
        "",
        *[f"    {c}" for c in results["commands"]],
        "",
        "Float reference = the GGUF dequantized by transformers (itself 4-bit blocks of 32: g32 rows line up with the "
        "file's blocks and are optimistic). `gguf-adopt` = `peqa_peft.load_gguf` of the file, untuned; `tuned-*` = "
        "the fixed tuning budget (notes: budget, learning rate, mean loss of the first/last steps, tensors changed). "
        "`*-fz` = min-max with a fractional zero-point (GGUF Q4_1's rule; not a package initializer, see the script). "
        "`load` = the 1-minute load average when the row finished (2 cores shared: seconds are inflated by it).",
        "",
        "| row | WikiText-2 | x fp32 | PTB | seconds | notes |",
        "|---|---:|---:|---:|---:|---|",
        *[table_line(k, rows[k], rows.get("fp32", {})) for k in sorted(rows, key=row_order)],
    ]
    if "alignment_4bit_rtn_relative_weight_error" in results:
        lines += [
            "",
            "4-bit RTN relative weight error ||W - W_hat||^2 / ||W||^2 over all targeted layers (``--alignment``):",
            "",
        ]
        lines += [f"- {k}: {v:.4g}" for k, v in results["alignment_4bit_rtn_relative_weight_error"].items()]
    path.write_text("\n".join(lines) + "\n")


class Bench:
    """One run: the float model, the evaluation tokens, the results file, and the GPTQ Hessians once computed."""

    def __init__(self, args):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from peqa_peft.workflows.evaluate import load_eval_text

        self.args = args
        self.out_dir = args.output_dir or REPO / "benchmarks" / "results" / "real-models" / args.model
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.results = self.load_results()
        self.model_dir = float_model_dir(args.model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.eval_ids = {
            name: self.tokenizer(load_eval_text(name), return_tensors="pt").input_ids[0][: args.max_tokens]
            for name in ("wikitext2", "ptb")
        }
        self.fp_model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).eval()
        self.hessians = None

    def load_results(self) -> dict:
        path = self.out_dir / "results.json"
        results = json.loads(path.read_text()) if path.exists() else {"rows": {}, "commands": []}
        settings = {"model": self.args.model, "max_tokens": self.args.max_tokens, "seq_len": self.args.seq_len}
        if any(results.get(k, v) != v for k, v in settings.items()):
            raise SystemExit(f"{path} was measured with other settings; use another --output-dir")
        results.update(settings, machine=machine())
        env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
        script = [f"benchmarks/{Path(__file__).name}", *sys.argv[1:]]
        command = env + "python " + " ".join(shlex.quote(a) for a in script)
        if command not in results["commands"]:
            results["commands"].append(command)
        return results

    def save(self) -> None:
        (self.out_dir / "results.json").write_text(json.dumps(self.results, indent=2))
        render(self.results, self.out_dir / "results.md")

    def ppl(self, model, dataset: str) -> float:
        from peqa_peft.workflows.evaluate import perplexity

        ids = self.eval_ids[dataset]
        return perplexity(model, input_ids=ids, seq_len=self.args.seq_len, progress=False).perplexity

    def init_row(self, key: str):
        """Sweep row ``<bits>-<group>-<init>``: the PEQA base at init, no tuning."""
        bits, group, init = key.split("-")
        model, fallback = peqa_model(self.fp_model, int(bits), group, "mse" if init == "mse" else "minmax")
        info = {"group_fallback": fallback_note(self.fp_model, group, fallback)} if fallback else {}
        if init == "fz":
            install_fractional_zero(model, self.fp_model, int(bits))
        if init == "gptq":
            if self.hessians is None:
                self.hessians = collect_hessians(self.fp_model, self.calibration_ids(), self.args.gptq_sink_weight)
            install_gptq(model, self.fp_model, self.hessians, int(bits))
            info["calibration"] = f"WikiText-2 valid {self.args.calib_windows}x{self.args.seq_len}"
            info["sink_weight"] = self.args.gptq_sink_weight
        return model, info

    def calibration_ids(self) -> torch.Tensor:
        text = (REPO / "assets" / "data" / "wikitext2_valid.tokens.txt").read_text(encoding="utf-8")
        ids = self.tokenizer(text, return_tensors="pt").input_ids[0]
        n, length = self.args.calib_windows, self.args.seq_len
        return ids[: n * length].view(n, length)

    def jobs(self) -> list[tuple[str, Callable, bool]]:
        """Every row asked for, in order: ``(key, build() -> (model, info), wants PTB)``."""
        args = self.args
        patterns = [p for p in args.configs.split(",") if p]
        # In the order of the patterns (the most wanted rows first), each config once.
        configs = list(dict.fromkeys(c for p in patterns for c in ALL_CONFIGS if fnmatch.fnmatch(c, p)))
        if patterns and not configs:
            raise SystemExit(f"--configs {args.configs!r} matches none of {ALL_CONFIGS}")
        names = [r for r in args.rows.split(",") if r]
        unknown = [n for n in names if n not in ROWS and n != "gguf-adopt"]
        if unknown:
            raise SystemExit(f"unknown row(s) {unknown}; choose from {ROWS} or gguf-adopt")
        jobs = [("fp32", lambda: (self.fp_model, {}), args.ptb)] if configs or names or args.adopt else []
        ptb_patterns = args.ptb_configs.split(",")
        for key in configs:
            want_ptb = args.ptb and any(fnmatch.fnmatch(key, p) for p in ptb_patterns)
            jobs.append((key, lambda key=key: self.init_row(key), want_ptb))
        for directory in args.adopt:
            jobs.append((f"adopt-{directory.name}", lambda d=directory: adopted_checkpoint(d), args.ptb))
        for name in names:
            if name == "gguf-adopt":
                jobs.append((name, lambda: adopted_gguf(args), args.ptb))
            else:
                lr = lr_override(name, args)
                key = f"tuned-{name}" + (f"-lr{lr:g}" if lr else "")
                jobs.append((key, lambda name=name: tune(name, self.model_dir, args, self.out_dir), args.ptb))
        return jobs

    def measure(self, build: Callable, want_ptb: bool) -> dict:
        """One row: build the model, WikiText-2 (and PTB) perplexity; an error is recorded, never dropped."""
        start = time.perf_counter()
        try:
            model, info = build()
            row = {"wikitext2": self.ppl(model, "wikitext2"), "ptb": self.ppl(model, "ptb") if want_ptb else None}
            row.update(info)
            if "lr" in info:
                row["budget"] = f"{self.args.steps} Alpaca SFT steps, 4 x 256"
        except Exception as err:
            row = {"error": f"{type(err).__name__}: {err}"[:300]}
        row["seconds"] = time.perf_counter() - start
        row["load"] = round(os.getloadavg()[0], 1)
        row["threads"] = torch.get_num_threads()
        return row

    def run(self) -> None:
        rows = self.results["rows"]
        for key, build, want_ptb in self.jobs():
            old = rows.get(key)
            if old and "error" not in old and not self.args.redo and (not want_ptb or old.get("ptb")):
                continue
            want_ptb = want_ptb or bool(old and old.get("ptb"))  # a re-measured row keeps every column it had
            row = self.measure(build, want_ptb)
            if old and old.get("wikitext2") and row.get("wikitext2"):
                # Re-measured (for PTB, or --redo): the same windows must give the same WikiText-2 perplexity.
                if abs(row["wikitext2"] / old["wikitext2"] - 1) > 1e-4:
                    row["previous_wikitext2"] = round(old["wikitext2"], 4)
            rows[key] = row
            print(json.dumps({key: row}), flush=True)
            self.save()
            gc.collect()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("smollm2-135m", "gemma3-270m"), required=True)
    parser.add_argument("--max-tokens", type=int, default=16384, help="WikiText-2/PTB test tokens scored")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--configs", default="4-*-*", help="comma list of <bits>-<ch|g128|g64|g32>-<rtn|mse|gptq>")
    parser.add_argument("--rows", default="", help=f"comma list of {','.join(ROWS)} (tuned) and gguf-adopt")
    parser.add_argument("--ptb", action="store_true", help="also PTB test perplexity")
    parser.add_argument("--ptb-configs", default="4-*-*", help="sweep rows that get PTB when --ptb is given")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--peqa3-group", type=int, default=None)
    parser.add_argument("--full-lr", type=float, default=2e-5)
    parser.add_argument("--qft-lr", type=float, default=None, help="IntLion lr of the qft row (default: the CLI's)")
    parser.add_argument("--peqa-lr", type=float, default=None, help="lr of the PEQA rows (default: the CLI's)")
    parser.add_argument("--calib-windows", type=int, default=16, help="GPTQ calibration windows of --seq-len")
    parser.add_argument(
        "--gptq-sink-weight", type=float, default=16.0, help="GPTQ Hessian weight of each window's first token"
    )
    parser.add_argument("--output-dir", type=Path, default=None)
    parser.add_argument("--redo", action="store_true")
    parser.add_argument(
        "--adopt",
        type=Path,
        nargs="*",
        default=[],
        help="compressed-tensors checkpoints to adopt untuned (rows adopt-<dir>)",
    )
    parser.add_argument("--alignment", action="store_true", help="measure how the GGUF blocks flatter group 32")
    args = parser.parse_args(argv)

    import peqa_peft  # noqa: F401

    torch.manual_seed(0)
    bench = Bench(args)
    if args.alignment:
        bench.results["alignment_4bit_rtn_relative_weight_error"] = alignment_check(bench.fp_model)
        print(json.dumps(bench.results["alignment_4bit_rtn_relative_weight_error"]), flush=True)
        bench.save()
    bench.run()


if __name__ == "__main__":
    main()
