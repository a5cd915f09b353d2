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
``init_method="minmax"``), ``mse`` (``"mse"``, the clipping search) or ``gptq`` (GPTQ, implemented here: Hessians of
every linear layer's inputs from one pass of the float model over ``--calib-windows`` x ``--seq-len`` tokens of
WikiText-2 *validation* (never the test split), then the GPTQ column-by-column solve with 1% dampening and a
min-max grid per group found on the error-updated weights; its codes/scales/zero-points are written into PEQA's
quantized base). A group size that does not divide a layer's ``in_features`` (SmolLM2's 576-wide inputs at g128)
uses the largest divisor of ``in_features`` below it that is a multiple of 32 (stated in the results as
``group_fallback``).

Tuning rows (``--rows``): the issue's fixed budget, 30 Alpaca SFT steps, batch 4 x 256 tokens, the CLI's defaults
otherwise (``peqa_peft.train``'s TrainConfig/SFTTrainer): ``peqa`` (the package's default 4-bit PEQA),
``peqa3`` (3-bit at ``--peqa3-group``), ``lora`` (r8 on fp32), ``qlora`` (the CLI's method), ``full`` (full
fine-tuning, AdamW lr ``--full-lr``), ``qft`` (the CLI's method) and ``peqa-gguf`` (``peqa_peft.load_gguf`` of the
file itself when that function exists). Perplexity after tuning is measured with the same windows as the sweep.

Results are appended to ``<output-dir>/results.json`` (rows already there are skipped unless ``--redo``) and
rendered into ``<output-dir>/results.md`` with the command and the machine.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import gc
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BITS = (4, 3, 2)
GROUPS = ("ch", "g128", "g64", "g32")
INITS = ("rtn", "mse", "gptq")
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


# ------------------------------------------------------------------------------------------------------------- GPTQ
@torch.no_grad()
def collect_hessians(fp_model, calib_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``H = 2/n * sum x x^T`` of every targeted linear layer's inputs over the calibration windows (float model)."""
    names = linear_names(fp_model)
    hessians = {n: torch.zeros(w, w) for n, w in names.items()}
    counts = dict.fromkeys(names, 0)
    hooks = []
    for name in names:

        def hook(module, args, _out, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            n_old, n_new = counts[name], counts[name] + x.shape[0]
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
def tune(row: str, model_dir: Path, args, out_dir: Path):
    """The fixed budget of the issue (30 Alpaca SFT steps, 4 x 256, CLI defaults); returns (model, extra info)."""
    from peft import get_peft_model
    from transformers import AutoTokenizer, set_seed

    from peqa_peft.workflows.data import load_instruction_dataset
    from peqa_peft.workflows.train import TrainConfig, build_trainer, load_base_model, peft_config_for

    method = {"peqa": "peqa", "peqa3": "peqa", "lora": "lora", "qlora": "qlora", "full": "lora", "qft": "qft"}
    bits = 3 if row == "peqa3" else 4
    cfg = TrainConfig(
        model=str(model_dir),
        method=method[row],
        output_dir=str(out_dir / "runs" / row),
        max_steps=args.steps,
        batch_size=4,
        seq_len=256,
        bits=bits,
        group_size=args.peqa3_group if row == "peqa3" else None,
        learning_rate=args.full_lr if row == "full" else None,
        progress=False,
    )
    dataset = load_instruction_dataset(cfg.dataset, max_samples=cfg.max_samples, seed=cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    set_seed(cfg.seed)
    base = load_base_model(cfg.model, cfg.method, False)
    if row == "full":
        model = base  # every parameter trains, plain AdamW (Trainer's adamw_torch)
    else:
        model = get_peft_model(base, peft_config_for(cfg))
    info = {"lr": cfg.learning_rate, "bits": bits if cfg.method == "peqa" else None, "group_size": cfg.group_size}
    trainer = build_trainer(cfg, model, tokenizer, dataset)
    result = trainer.train()
    info["train_loss"] = round(result.training_loss, 4)
    return model.eval(), info


def tune_gguf(args):
    import peqa_peft

    if not hasattr(peqa_peft, "load_gguf"):
        raise RuntimeError("peqa_peft.load_gguf does not exist in this checkout (GGUF adoption not merged)")
    raise NotImplementedError("peqa-gguf: plug peqa_peft.load_gguf(gguf_path(...)) in here once it is merged")


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


def render(results: dict, path: Path) -> None:
    rows = results["rows"]
    fp = rows.get("fp32", {})
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
        "file's blocks and are optimistic).",
        "",
        "| row | WikiText-2 | x fp32 | PTB | seconds | notes |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for key, r in rows.items():
        if "error" in r:
            lines.append(f"| {key} | — | — | — | — | {r['error']} |")
            continue
        ratio = r["wikitext2"] / fp["wikitext2"] if fp.get("wikitext2") else float("nan")
        ptb = f"{r['ptb']:.2f}" if r.get("ptb") else ""
        notes = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("wikitext2", "ptb", "seconds") and v)
        lines.append(f"| {key} | {r['wikitext2']:.2f} | {ratio:.3f} | {ptb} | {r['seconds']:.0f} | {notes} |")
    if "alignment_4bit_rtn_relative_weight_error" in results:
        lines += [
            "",
            "4-bit RTN relative weight error ||W - W_hat||^2 / ||W||^2 over all targeted layers (``--alignment``):",
            "",
        ]
        lines += [f"- {k}: {v:.4g}" for k, v in results["alignment_4bit_rtn_relative_weight_error"].items()]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("smollm2-135m", "gemma3-270m"), required=True)
    parser.add_argument("--max-tokens", type=int, default=16384, help="WikiText-2/PTB test tokens scored")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--configs", default="4-*-*", help="comma list of <bits>-<ch|g128|g64|g32>-<rtn|mse|gptq>")
    parser.add_argument("--rows", default="", help=f"tuning rows, comma list of {','.join(ROWS)}")
    parser.add_argument("--ptb", action="store_true", help="also PTB test perplexity")
    parser.add_argument("--ptb-configs", default="4-*-*", help="sweep rows that get PTB when --ptb is given")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--peqa3-group", type=int, default=None)
    parser.add_argument("--full-lr", type=float, default=2e-5)
    parser.add_argument("--calib-windows", type=int, default=16, help="GPTQ calibration windows of --seq-len")
    parser.add_argument("--output-dir", type=Path, default=None)
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--alignment", action="store_true", help="measure how the GGUF blocks flatter group 32")
    args = parser.parse_args(argv)
    out_dir = args.output_dir or REPO / "benchmarks" / "results" / "real-models" / args.model
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"rows": {}, "commands": []}
    command = "python " + " ".join(shlex.quote(a) for a in [f"benchmarks/{Path(__file__).name}", *sys.argv[1:]])
    settings = {"model": args.model, "max_tokens": args.max_tokens, "seq_len": args.seq_len}
    if any(results.get(k, v) != v for k, v in settings.items()):
        raise SystemExit(f"{results_path} was measured with other settings; use another --output-dir")
    results.update(settings, machine=machine())
    if command not in results["commands"]:
        results["commands"].append(command)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import peqa_peft  # noqa: F401
    from peqa_peft.workflows.evaluate import load_eval_text, perplexity

    torch.manual_seed(0)
    model_dir = float_model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eval_ids = {
        name: tokenizer(load_eval_text(name), return_tensors="pt").input_ids[0][: args.max_tokens]
        for name in ("wikitext2", "ptb")
    }

    def ppl(model, dataset="wikitext2") -> float:
        return perplexity(model, input_ids=eval_ids[dataset], seq_len=args.seq_len, progress=False).perplexity

    def save():
        results_path.write_text(json.dumps(results, indent=2))
        render(results, out_dir / "results.md")

    rows = results["rows"]
    fp_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    measuring = bool(args.configs or args.rows)  # --alignment alone needs no perplexity
    if measuring and ("fp32" not in rows or (args.ptb and not rows["fp32"].get("ptb"))):
        start = time.perf_counter()
        rows["fp32"] = {"wikitext2": ppl(fp_model), "ptb": ppl(fp_model, "ptb") if args.ptb else None}
        rows["fp32"]["seconds"] = time.perf_counter() - start
        save()
    if args.alignment:
        results["alignment_4bit_rtn_relative_weight_error"] = alignment_check(fp_model)
        print(json.dumps(results["alignment_4bit_rtn_relative_weight_error"]), flush=True)
        save()
    patterns = [p for p in args.configs.split(",") if p]
    # In the order of the patterns (the most wanted rows first), each config once.
    configs = list(dict.fromkeys(c for p in patterns for c in ALL_CONFIGS if fnmatch.fnmatch(c, p)))
    if patterns and not configs:
        raise SystemExit(f"--configs {args.configs!r} matches none of {ALL_CONFIGS}")
    hessians = None
    for key in configs:
        want_ptb = args.ptb and any(fnmatch.fnmatch(key, p) for p in args.ptb_configs.split(","))
        if key in rows and not args.redo and (not want_ptb or rows[key].get("ptb")):
            continue
        bits, group, init = key.split("-")
        start = time.perf_counter()
        try:
            model, fallback = peqa_model(fp_model, int(bits), group, "mse" if init == "mse" else "minmax")
            if init == "gptq":
                if hessians is None:
                    calib = tokenizer(
                        (REPO / "assets" / "data" / "wikitext2_valid.tokens.txt").read_text(encoding="utf-8"),
                        return_tensors="pt",
                    ).input_ids[0]
                    calib = calib[: args.calib_windows * args.seq_len].view(args.calib_windows, args.seq_len)
                    hessians = collect_hessians(fp_model, calib)
                install_gptq(model, fp_model, hessians, int(bits))
            row = {"wikitext2": ppl(model), "ptb": ppl(model, "ptb") if want_ptb else None}
            if fallback:
                row["group_fallback"] = f"{len(fallback)} layers at g{sorted(set(fallback.values()))}"
            if init == "gptq":
                row["calibration"] = f"WikiText-2 valid {args.calib_windows}x{args.seq_len}"
        except Exception as err:  # a row that cannot run is reported as such, never dropped
            row = {"error": f"{type(err).__name__}: {err}"[:300]}
        row["seconds"] = time.perf_counter() - start
        rows[key] = row
        print(json.dumps({key: row}), flush=True)
        save()
        model = None
        gc.collect()
    for name in [r for r in args.rows.split(",") if r]:
        if name not in ROWS:
            raise SystemExit(f"unknown row {name!r}; choose from {ROWS}")
        key = f"tuned-{name}"
        if key in rows and not args.redo:
            continue
        start = time.perf_counter()
        try:
            model, info = tune_gguf(args) if name == "peqa-gguf" else tune(name, model_dir, args, out_dir)
            row = {"wikitext2": ppl(model), "ptb": ppl(model, "ptb") if args.ptb else None, **info}
            row["budget"] = f"{args.steps} Alpaca SFT steps, 4 x 256"
        except Exception as err:
            row = {"error": f"{type(err).__name__}: {err}"[:300]}
        row["seconds"] = time.perf_counter() - start
        rows[key] = row
        print(json.dumps({key: row}), flush=True)
        save()
        model = None
        gc.collect()


if __name__ == "__main__":
    main()
