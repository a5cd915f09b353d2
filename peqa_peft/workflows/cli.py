"""The ``peqa-peft`` command line (also ``python -m peqa_peft``): ``train``, ``eval`` and ``export``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from typing import Optional

from .train import DEFAULT_LR, METHODS, TrainConfig


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= ``minimum`` (the error names the expected range)."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {number}")
        return number

    return parse


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {value}")
    return number


def _bits(value: str) -> int:
    from ..core import SUPPORTED_BITS

    bits = _int_at_least(0, "")(value)
    if bits not in SUPPORTED_BITS:
        raise argparse.ArgumentTypeError(f"must be one of {SUPPORTED_BITS}, got {bits}")
    return bits


def _max_steps(value: str) -> int:
    steps = _int_at_least(-1, "a positive number of steps, or -1 to train for --epochs")(value)
    if steps == 0:
        raise argparse.ArgumentTypeError("must be a positive number of steps, or -1 to train for --epochs, got 0")
    return steps


PER_CHANNEL = "channel"  # --group-size none|channel|0, told apart from "not given" (None) until the config is built


def _group_size(value: str):
    """``auto``, a positive group size, or none/channel/0 (per output channel, returned as PER_CHANNEL)."""
    if value.lower() == "auto":
        return "auto"
    if value.lower() in ("none", "channel", "0"):
        return PER_CHANNEL
    return _int_at_least(1, "'auto', a positive group size, or 'none' for per-channel scales")(value)


def _config_group_size(value):
    """The PeqaConfig value of a parsed --group-size (PER_CHANNEL -> None)."""
    return None if value == PER_CHANNEL else value


_positive = _int_at_least(1, "a positive integer")
_non_negative = _int_at_least(0, "0 or a positive integer")
_seq_len = _int_at_least(2, "at least 2 tokens")


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune on Alpaca with SFTTrainer (peqa, qft, lora, qlora)")
    p.add_argument(
        "--model", required=True, help="Hub id or local path of a causal LM, a .gguf file or a zoo name (smollm2-135m)"
    )
    p.add_argument("--method", choices=METHODS, default="peqa")
    p.add_argument("--output-dir", required=True, help="where the adapter, card and summary are written")
    p.add_argument("--dataset", default=None, help="Hub id (tatsu-lab/alpaca) or local JSON/JSONL; default bundled")
    p.add_argument("--max-samples", type=_positive, default=None, help="use a seeded random subset of the dataset")
    p.add_argument("--bits", type=_bits, default=None, help="PEQA weight bits (2..8, default 4; --method peqa only)")
    p.add_argument(
        "--group-size",
        type=_group_size,
        default=None,
        help="PEQA group size: auto (default: 32 where it divides every layer's width, else per channel), an int, "
        "or none (per channel); peqa only",
    )
    p.add_argument("--target-modules", default="all-linear", help="'all-linear' or comma-separated module names")
    p.add_argument(
        "--qft-linear-only",
        action="store_true",
        help="QFT: tune only the linear layers (default: every parameter; --method qft only)",
    )
    p.add_argument("--lora-r", type=_positive, default=8)
    p.add_argument("--lora-alpha", type=_positive, default=16)
    p.add_argument("--max-steps", type=_max_steps, default=-1, help="optimizer steps (default -1: --epochs)")
    p.add_argument("--epochs", dest="num_epochs", type=_positive_float, default=1.0)
    p.add_argument(
        "--lr",
        dest="learning_rate",
        type=_positive_float,
        default=None,
        help=f"learning rate (defaults: {DEFAULT_LR}; PEQA's is lowered to 0.4%% of the model's median base scale "
        "where that is smaller)",
    )
    p.add_argument("--batch-size", type=_positive, default=8)
    p.add_argument("--grad-accum", type=_positive, default=1)
    p.add_argument("--seq-len", type=_seq_len, default=512, help="maximum tokens per example")
    p.add_argument("--seed", type=_non_negative, default=42)
    p.add_argument("--bf16", action="store_true", help="train in bfloat16 mixed precision")
    p.add_argument("--logging-steps", type=_positive, default=10)
    p.add_argument(
        "--save-steps", type=_non_negative, default=0, help="checkpoint every N steps (0: only the final adapter)"
    )
    p.add_argument("--resume-from-checkpoint", default=None, help="a checkpoint directory, or 'last'")
    p.add_argument("--push-to-hub", default=None, metavar="REPO", help="upload the adapter and card to this repo")
    p.add_argument("--eval", dest="eval_datasets", default="", help="after training: comma list of wikitext2,ptb")
    p.add_argument("--eval-max-tokens", type=_positive, default=None)
    p.add_argument("--data-dir", dest="eval_data_dir", default=None, help="local copies of the evaluation sets")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_train)


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity (WikiText-2, PTB, a text file) and 5-shot MMLU")
    p.add_argument("--model", required=True, help="Hub id or local path of the base model, a .gguf file or a zoo name")
    p.add_argument("--adapter", default=None, help="adapter directory or Hub id (PEQA, QFT, LoRA)")
    p.add_argument("--bits", type=_bits, default=None, help="evaluate the base quantized to this many bits")
    p.add_argument(
        "--group-size", type=_group_size, default="auto", help="with --bits: auto (PEQA's default), an int, or none"
    )
    p.add_argument(
        "--quant-method",
        choices=("auto", "minmax", "mse"),
        default="auto",
        help="PEQA init of --bits: auto (mse with groups, minmax per channel), minmax = RTN, mse",
    )
    p.add_argument("--load-in-4bit", action="store_true", help="load the base in bitsandbytes NF4 (QLoRA adapters)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--text-file", default=None, help="score this UTF-8 text file")
    source.add_argument("--dataset", choices=("wikitext2", "ptb"), default=None)
    p.add_argument("--data-dir", default=None, help="directory with local copies of the evaluation sets")
    p.add_argument("--max-tokens", type=_positive, default=None, help="score only the first N tokens")
    p.add_argument("--seq-len", type=_seq_len, default=None, help="window length (default: model context, max 2048)")
    p.add_argument("--batch-size", type=_positive, default=8)
    p.add_argument("--mmlu", action="store_true", help="also run 5-shot MMLU through lm-eval")
    p.add_argument("--mmlu-dir", default=None, help="local copy of the cais/mmlu dataset repository")
    p.add_argument("--mmlu-limit", type=_positive, default=None, help="questions per subject (quick checks)")
    p.add_argument("--mmlu-tasks", default="mmlu", help="lm-eval task names, comma-separated (default: mmlu)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON line at the end")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_eval)


def add_export_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="write base + PEQA adapter as a merged low-bit checkpoint (vLLM, llama.cpp, GPTQ)"
    )
    p.add_argument("--model", required=True, help="Hub id or local path of the base model the adapter was trained on")
    p.add_argument("--adapter", required=True, help="PEQA adapter directory or Hub id")
    p.add_argument("--format", required=True, choices=("compressed-tensors", "gguf", "gptq"))
    p.add_argument("--output-dir", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    p.add_argument("--tokenizer", default=None, help="tokenizer path or id (default: the base model's)")
    p.add_argument("--gguf-float-type", choices=("f16", "f32"), default="f16", help="gguf: unquantized tensors")
    p.add_argument(
        "--ct-target",
        choices=("any", "vllm-cpu"),
        default="any",
        help="compressed-tensors: the file is the same for vLLM and transformers; 'vllm-cpu' also refuses up front "
        "layers vLLM cannot serve on CPU",
    )
    p.add_argument("--gptq-checkpoint-format", choices=("gptq_v2", "gptq"), default="gptq_v2")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> str:
    from ..integrations.formats import export_adapter

    options = {
        "gguf": {"float_type": args.gguf_float_type},
        "compressed-tensors": {"target": args.ct_target},
        "gptq": {"checkpoint_format": args.gptq_checkpoint_format},
    }[args.format]
    out = export_adapter(
        args.model, args.adapter, args.output_dir, args.format, args.tokenizer, args.overwrite, **options
    )
    print(f"exported {args.format} to {out}")
    return str(out)


def run_train(args: argparse.Namespace) -> dict:
    from .train import format_summary, train

    # argparse destinations are named after TrainConfig's fields; only lists and the progress switch need mapping
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    if args.method != "peqa" and (args.bits is not None or args.group_size is not None):
        raise ValueError(f"--bits/--group-size set PEQA's quantization; they do not apply to --method {args.method}")
    if args.method != "qft" and args.qft_linear_only:
        raise ValueError(f"--qft-linear-only selects QFT's targets; it does not apply to --method {args.method}")
    if values["bits"] is None:
        del values["bits"]  # TrainConfig's default
    if values["group_size"] is None:
        del values["group_size"]  # TrainConfig's default ("auto")
    else:
        values["group_size"] = _config_group_size(values["group_size"])
    if args.target_modules != "all-linear":
        values["target_modules"] = args.target_modules.split(",")
    values["eval_datasets"] = [d for d in args.eval_datasets.split(",") if d]
    values["progress"] = not args.no_progress
    cfg = TrainConfig(**values)
    summary = train(cfg)
    print(format_summary(summary))
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, default=str))
    return summary


def read_text_file(path: str) -> str:
    """The UTF-8 text of ``path``; errors name the file."""
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"text file {path} does not exist or is not a file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"text file {path} is not UTF-8 text (byte {err.start}: {err.reason})") from None
    if not text.strip():
        raise ValueError(f"text file {path} is empty")
    return text


def run_eval(args: argparse.Namespace) -> dict:

    from .evaluate import load_eval_text, load_for_eval, mmlu_accuracy, perplexity

    if not (args.text_file or args.dataset or args.mmlu):
        raise SystemExit("peqa-peft eval: give --text-file, --dataset or --mmlu")
    text = read_text_file(args.text_file) if args.text_file else None
    model, tokenizer = load_for_eval(
        args.model,
        args.adapter,
        args.bits,
        _config_group_size(args.group_size),
        args.quant_method,
        load_in_4bit=args.load_in_4bit,
    )
    group_size = next(iter(model.peft_config.values())).group_size if args.bits else None  # "auto" resolved
    result = {"model": args.model, "adapter": args.adapter, "bits": args.bits, "group_size": group_size}
    if args.text_file or args.dataset:
        if text is None:
            text = load_eval_text(args.dataset, args.data_dir)
        ppl = perplexity(
            model,
            tokenizer,
            text,
            seq_len=args.seq_len,
            max_tokens=args.max_tokens,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )
        result.update(source=args.text_file or args.dataset, **ppl.to_dict())
        print(f"perplexity {ppl.perplexity:.4f} on {ppl.tokens} tokens ({ppl.windows} x {ppl.seq_len}-token windows)")
    if args.mmlu:
        mmlu = mmlu_accuracy(
            model,
            tokenizer,
            data_dir=args.mmlu_dir,
            limit=args.mmlu_limit,
            batch_size=args.batch_size,
            tasks=tuple(args.mmlu_tasks.split(",")),
        )
        result["mmlu"] = mmlu
        print(f"MMLU {mmlu['num_fewshot']}-shot accuracy {mmlu['accuracy']:.4f}")
    if args.json:
        print(json.dumps(result, default=str))
    return result


# What a user can cause by what they pass: reported in one line, exit status 2. Anything else is a bug and keeps
# its traceback. OSError covers unreadable/unwritable paths (PermissionError, IsADirectoryError, ...).
USER_ERRORS = (ValueError, TypeError, OSError)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="peqa-peft", description="Quantization-aware fine-tuning with PEFT")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_eval_parser(sub)
    add_export_parser(sub)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as err:
        if args.debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"peqa-peft {args.command}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2
    return 0
