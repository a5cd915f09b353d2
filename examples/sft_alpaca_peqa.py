"""PEQA on Alpaca with TRL's SFTTrainer: quantize to 4 bits, tune only the scales, compare perplexity before/after.

    python examples/sft_alpaca_peqa.py                      # bundled 6.8M-param Llama, a few minutes on 2 CPU cores
    python examples/sft_alpaca_peqa.py --model meta-llama/Llama-2-7b-hf --dataset tatsu-lab/alpaca --steps 1000

Prints WikiText-2 test perplexity of the fp model, the quantized model and the PEQA-tuned model, saves the scale
adapter, reloads it onto a fresh base and checks that the logits are identical. Uses only the public API.
"""

from __future__ import annotations

import argparse
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
from peqa_peft.workflows.data import load_instruction_dataset
from peqa_peft.workflows.evaluate import load_eval_text, perplexity

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "assets" / "demo-llama"), help="Hub id or local path")
    p.add_argument("--dataset", default=None, help="Hub id or local JSON (default: bundled 5,000 Alpaca rows)")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--eval-tokens", type=int, default=65536, help="WikiText-2 test tokens to score (0: all)")
    p.add_argument("--output-dir", default="outputs/sft-alpaca-peqa")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def wikitext_ppl(model, eval_ids: torch.Tensor, seq_len: int) -> float:
    return perplexity(model, input_ids=eval_ids, seq_len=seq_len, progress=False).perplexity


def main() -> None:
    args = parse_args()
    start = time.time()
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    seq_len = min(args.seq_len, model.config.max_position_embeddings)
    eval_ids = tokenizer(load_eval_text("wikitext2"), return_tensors="pt").input_ids
    eval_ids = eval_ids[:, : args.eval_tokens] if args.eval_tokens else eval_ids

    ppl = {"fp32": wikitext_ppl(model, eval_ids, seq_len)}
    model = get_peft_model(model, PeqaConfig(bits=args.bits, group_size=args.group_size, task_type="CAUSAL_LM"))
    model.print_trainable_parameters()
    ppl["quantized"] = wikitext_ppl(model, eval_ids, seq_len)

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
    ppl["peqa"] = wikitext_ppl(model, eval_ids, seq_len)
    trainer.save_model(args.output_dir)

    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(args.model), args.output_dir)
    probe = eval_ids[:, :seq_len]
    model.eval()
    with torch.no_grad():
        identical = torch.equal(fresh(probe).logits, model(probe).logits)

    tokens = min(eval_ids.shape[1], args.eval_tokens or eval_ids.shape[1])
    print(f"\nWikiText-2 test perplexity ({tokens} tokens, {seq_len}-token windows):")
    print(f"  fp32                                 {ppl['fp32']:9.2f}")
    print(f"  {args.bits}-bit, before tuning (PEQA init)     {ppl['quantized']:9.2f}")
    print(f"  {args.bits}-bit PEQA after {args.steps} SFT steps       {ppl['peqa']:9.2f}")
    size = os.path.getsize(Path(args.output_dir) / "adapter_model.safetensors")
    print(f"Adapter: {args.output_dir} ({size / 1024:.1f} KiB); reloaded logits identical: {identical}")
    summary = {f"ppl_{k}": round(v, 3) for k, v in ppl.items()}
    summary.update(adapter_bytes=size, identical_reload=identical, seconds=round(time.time() - start, 1))
    print(json.dumps(summary))
    if not identical:
        raise SystemExit("the reloaded adapter does not reproduce the trained model")


if __name__ == "__main__":
    main()
