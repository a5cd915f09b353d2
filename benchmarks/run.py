"""Benchmark PEQA and QFT against LoRA, QLoRA and low-bit optimizers: memory, speed and quality in one run.

    python benchmarks/run.py --quick --output-dir benchmarks/results      # bundled demo Llama, < 10 min on 2 CPUs
    python benchmarks/run.py --model meta-llama/Llama-2-7b-hf --output-dir out --steps 200   # any Hub id / path
    python benchmarks/run.py --tiny --configs lora_fp,peqa4 --output-dir /tmp/b   # smoke test of the harness
    python benchmarks/run.py --llama-shaped --output-dir /tmp/speed   # speed/memory at real layer sizes (~15 min)

Every configuration starts from the same float32 checkpoint, trains on the same Alpaca batches (loss on the
response tokens only) and is evaluated on the same WikiText-2 tokens. Each configuration runs in its own forked
child process (``--in-process`` to disable), so the peak resident memory of its training steps is its own; all of
them run within this one invocation, so step-time ratios to LoRA-on-fp are taken on the same machine minutes
apart. On a CPU shared with other jobs, one torch thread (the --quick default) gives far steadier step times than
two OpenMP threads competing for two busy cores. Configurations that cannot run here (a missing optional package,
a missing API, GPU-only) are skipped with the reason printed and written to the table.

Outputs in ``--output-dir``: ``results.json``, ``results.md`` (tables), ``README_table.md`` (headline table with
date, machine and command) and PNG plots.

``--llama-shaped`` measures speed and memory only, at real layer sizes: a Llama with random weights (hidden 2048,
intermediate 5632, 32 heads / 4 KV heads, 2 layers, vocab 32000; built from a config in a temporary directory at run
time and deleted afterwards, never committed), one Alpaca example of up to 256 tokens per step, one torch thread.
It writes ``speed.md`` (and ``results.json``): step time, tokens/s, decode ms/token, peak RSS and quantization
weights/s of every configuration as ratios to LoRA-on-fp, QLoRA and fp32 AdamW full fine-tuning measured in the
same run. Quality is not measured there (random weights); it stays on the pretrained demo model.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # bench_* helper modules live next to this script

DEMO_MODEL = REPO / "assets" / "demo-llama"
ALPACA = REPO / "assets" / "data" / "alpaca_data_5000.json"
# The speed preset's model: the layer sizes of a 1B-class Llama (TinyLlama-1.1B's), 2 of its 22 layers.
LLAMA_SHAPE = dict(
    vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=2, num_attention_heads=32,
    num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
)  # fmt: skip
LLAMA_SHAPED_CONFIGS = "lora_fp,fp_ref,peqa4,peqa4_g,peqa3,qlora_nf4,qft,full_adamw"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEMO_MODEL), help="Hub id or local path of a causal LM")
    p.add_argument("--output-dir", default=str(HERE / "results"))
    p.add_argument("--quick", action="store_true", help="short settings for 2 CPU cores (< 10 min on the demo model)")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama and 2 steps: a smoke test of the harness")
    p.add_argument(
        "--llama-shaped",
        action="store_true",
        help="speed/memory only on a Llama-shaped random-weight model built at run time (see above)",
    )
    p.add_argument("--speed-only", action="store_true", help="skip perplexity and adapter I/O; write speed.md")
    p.add_argument(
        "--adaptation",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run the QFT-quality rows (qft_quality.py --recommended: WikiText-2 valid->test adaptation, "
        "fp32 AdamW / Lion full fine-tuning vs QFT + IntLion); on by default with --quick",
    )
    p.add_argument("--configs", default="all", help="comma-separated configuration names (see --list)")
    p.add_argument("--list", action="store_true", help="list the configurations and exit")
    p.add_argument("--steps", type=int, default=None, help="training steps per configuration (same for all)")
    p.add_argument("--warmup", type=int, default=None, help="steps excluded from the timing median")
    p.add_argument("--batch-size", type=int, default=8, help="Alpaca examples per step")
    p.add_argument("--seq-len", type=int, default=256, help="max tokens of an Alpaca example")
    p.add_argument("--eval-tokens", type=int, default=None, help="WikiText-2 test tokens scored (0 = all)")
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--group-size", type=int, default=128, help="group size of the grouped PEQA rows (see --help)")
    p.add_argument("--gen-tokens", type=int, default=None, help="tokens generated to time decoding")
    p.add_argument("--in-process", action="store_true", help="run all configurations in this process (RSS mixed)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: 1 with --quick, else torch's choice)"
    )
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in the report's command line
    _apply_presets(args)
    return args


def _apply_presets(args: argparse.Namespace) -> None:
    """Fill unset step/eval budgets from --tiny / --quick / --llama-shaped / full presets."""
    preset = {"steps": 40, "warmup": 5, "eval_tokens": 0, "gen_tokens": 32}
    if args.quick:
        preset = {"steps": 20, "warmup": 4, "eval_tokens": 8192, "gen_tokens": 16, "threads": 1}
    if args.llama_shaped:
        preset = {"steps": 6, "warmup": 2, "eval_tokens": 512, "gen_tokens": 8, "threads": 1}
        args.speed_only = True
        if "--batch-size" not in args.argv:
            args.batch_size = 1
        if args.configs == "all":
            args.configs = LLAMA_SHAPED_CONFIGS
    if args.tiny:
        preset = {"steps": 2, "warmup": 1, "eval_tokens": 512}
        args.batch_size, args.seq_len, args.eval_seq_len, args.gen_tokens = 2, 128, 64, 4
    preset.setdefault("adaptation", bool(args.quick))
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


# ---------------------------------------------------------------- shared data


def make_tiny_model(out_dir: Path) -> str:
    """A tiny random Llama with the demo tokenizer, saved under ``out_dir`` (for --tiny)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = out_dir / "tiny-llama"
    if not (path / "config.json").exists():
        import torch

        torch.manual_seed(0)
        tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
        config = LlamaConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
        )  # fmt: skip
        LlamaForCausalLM(config).save_pretrained(path)
        tok.save_pretrained(path)
    return str(path)


def make_llama_shaped_model(out_dir: Path) -> str:
    """A random-weight Llama of :data:`LLAMA_SHAPE` with the demo tokenizer, saved under ``out_dir``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = out_dir / "llama-shaped"
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    special = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(LlamaConfig(**LLAMA_SHAPE, **special)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def load_data(args: argparse.Namespace) -> dict[str, Any]:
    """Tokenized Alpaca batches (response-only labels) and WikiText-2 ids: identical in every worker."""
    from transformers import AutoConfig, AutoTokenizer

    sys.path.insert(0, str(REPO / "examples"))
    from peqa_quickstart import collate  # the Alpaca prompt + response-only labels of the quickstart

    from peqa_peft.workflows.evaluate import load_eval_text

    tok = AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    rows = json.loads(ALPACA.read_text(encoding="utf-8"))
    random.Random(args.seed).shuffle(rows)
    bs = args.batch_size
    batches = [collate(rows[i * bs : (i + 1) * bs], tok, args.seq_len) for i in range(args.steps)]
    text = load_eval_text("wikitext2")
    if args.eval_tokens:
        text = text[: args.eval_tokens * 6]  # far more characters than tokens needed; avoids tokenizing all
    eval_ids = tok(text, return_tensors="pt").input_ids
    if args.eval_tokens:
        eval_ids = eval_ids[:, : args.eval_tokens]
    config = AutoConfig.from_pretrained(args.model)
    return {"batches": batches, "eval_ids": eval_ids, "n_params": _count_params(args.model), "config": config}


def _count_params(model_path: str) -> int:
    """Parameters of the float checkpoint (the denominator of every bytes-per-parameter figure)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- worker


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Run the configuration ``args.worker`` in this process."""
    import torch
    from bench_configs import DEFAULT_LR, Context, all_specs, pick_group_size
    from bench_worker import run_spec
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    data = load_data(args)
    with torch.device("meta"):
        group, note = pick_group_size(_meta_model(args.model), args.group_size)
    ctx = Context(args.model, device, group, dict(DEFAULT_LR), group_note=note)
    spec = {s.name: s for s in all_specs()}[args.worker]
    opts = {
        "steps": args.steps, "warmup": args.warmup, "eval_seq_len": min(args.eval_seq_len, _max_pos(data)),
        "gen_tokens": args.gen_tokens, "gen_repeats": 1 if args.tiny else 2 if args.quick else 3,
        "quality": not args.speed_only,
    }  # fmt: skip
    result = run_spec(spec, ctx, data, opts)
    result.update(group_size=group, n_params=data["n_params"], device=str(device))
    return result


def _meta_model(model_path: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))


def _max_pos(data: dict[str, Any]) -> int:
    return int(getattr(data["config"], "max_position_embeddings", 2048) or 2048)


# ---------------------------------------------------------------- orchestrator


def _selected(args: argparse.Namespace) -> list[str]:
    from bench_configs import all_specs

    names = [s.name for s in all_specs()]
    if args.configs == "all":
        return names
    wanted = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; choose from {names}")
    return [n for n in names if n in wanted]  # report order


def _run_forked(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One configuration in a forked child process; its result (or the failure) comes back through a pipe.

    Forking keeps the imports of the parent (seconds per configuration saved) while the child's peak RSS
    (VmHWM, reset before the timed steps) and its allocator state are its own. The parent runs no torch
    computation before forking, so no OpenMP thread pool is inherited half-initialized.
    """
    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(name, args, sender))
    proc.start()
    sender.close()
    try:
        result = receiver.recv()
    except EOFError:
        result = {"name": name, "skipped": "failed: the worker process died"}
    proc.join()
    if proc.exitcode not in (0, None) and "skipped" not in result:
        result = {"name": name, "skipped": f"failed: worker exit code {proc.exitcode}"}
    return result


def _child(name: str, args: argparse.Namespace, sender) -> None:
    sender.send(_run_in_process(name, args))
    sender.close()


def _run_in_process(name: str, args: argparse.Namespace) -> dict[str, Any]:
    try:
        return worker(argparse.Namespace(**{**vars(args), "worker": name}))
    except Exception as exc:  # a broken configuration must not stop the others
        return {"name": name, "skipped": f"failed: {type(exc).__name__}: {str(exc)[:300]}"}


def _call(fn, arg: Any, in_process: bool) -> Any:
    """``fn(arg)``, in a forked child unless ``in_process`` (keeps torch computation out of the parent)."""
    if in_process:
        return fn(arg)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        return pool.apply(fn, (arg,))


def _default_threads() -> int:
    import torch

    return torch.get_num_threads()


def machine_description() -> str:
    """CPU model and core count, or the GPU name."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def orchestrate(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run every selected configuration, print progress and skip reasons, write the report."""
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    in_process = args.in_process or "fork" not in multiprocessing.get_all_start_methods()
    if args.tiny:
        args.model = _call(make_tiny_model, out_dir, in_process)
    if args.llama_shaped:  # random weights of real size: built here, deleted afterwards, never in the repo
        model_dir = Path(tempfile.mkdtemp(prefix="peqa-llama-shaped-"))
        try:
            args.model = _call(make_llama_shaped_model, model_dir, in_process)
            return _run_all(args, out_dir, in_process)
        finally:
            shutil.rmtree(model_dir, ignore_errors=True)
    return _run_all(args, out_dir, in_process)


def _run_all(args: argparse.Namespace, out_dir: Path, in_process: bool) -> list[dict[str, Any]]:
    from bench_report import write_report, write_speed_report

    start = time.time()
    results = []
    for name in _selected(args):
        t0 = time.time()
        result = _run_in_process(name, args) if in_process else _run_forked(name, args)
        results.append(result)
        status = f"SKIPPED: {result['skipped']}" if "skipped" in result else _status(result)
        print(f"[{time.time() - start:6.0f}s] {name:<16} {time.time() - t0:5.1f}s  {status}", flush=True)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_description(),
        "command": "python benchmarks/run.py " + " ".join(args.argv),
        "wall_s": time.time() - start,
        "threads": args.threads or _default_threads(),
        "settings": {k: getattr(args, k) for k in ("model", "steps", "warmup", "batch_size", "seq_len")}
        | ({"model": "Llama-shaped random weights " + str(LLAMA_SHAPE)} if args.llama_shaped else {})
        | {k: getattr(args, k) for k in ("eval_tokens", "eval_seq_len", "group_size", "gen_tokens")},
    }
    if args.speed_only:
        write_speed_report(results, meta, out_dir)
        print(f"wrote {out_dir}/speed.md and results.json in {time.time() - start:.0f}s")
    else:
        write_report(results, meta, out_dir)
        print(f"wrote {out_dir}/results.md, README_table.md, results.json and plots in {time.time() - start:.0f}s")
    if args.adaptation and not args.speed_only:
        _append_adaptation(args, out_dir)
    return results


def _append_adaptation(args: argparse.Namespace, out_dir: Path) -> None:
    """Run qft_quality.py's recommended rows on ``args.model`` and append their table to results.md."""
    import qft_quality

    # Quality only (no timing here), so torch's default thread count rather than the timing runs' one thread.
    quality_args = qft_quality.parse_args(["--recommended", "--model", args.model, "--seed", str(args.seed)])
    rows, untuned, text = qft_quality.run(quality_args)
    title = "## QFT quality: WikiText-2 adaptation (each method at its recommended learning rate and betas)"
    section = [title, "", text]
    with open(out_dir / "results.md", "a") as f:
        f.write("\n".join(section))
    record = qft_quality.record_of(rows, untuned, quality_args)
    (out_dir / "adaptation.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"appended the WikiText-2 adaptation rows to {out_dir}/results.md")


def _status(result: dict[str, Any]) -> str:
    if result.get("ppl") is not None:
        return f"ppl {result['ppl']:.2f}"
    step = result.get("step_s")
    return f"step {step * 1e3:.0f} ms" if step else "done"


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer's threads must not straddle a fork
    args = parse_args(argv)
    if args.list:
        from bench_configs import all_specs

        for spec in all_specs():
            print(f"{spec.name:<18} {spec.label}")
        return
    if args.worker:  # one configuration in this process, result as JSON (for debugging or external drivers)
        result = worker(args)
        Path(args.result_file or f"{args.worker}.json").write_text(json.dumps(result, default=str))
        return
    orchestrate(args)


if __name__ == "__main__":
    main()
