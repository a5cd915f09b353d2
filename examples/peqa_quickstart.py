"""PEQA quickstart with a plain PyTorch loop: quantize to 4 bits, tune only the scales on Alpaca, evaluate, reload.

(`sft_alpaca_peqa.py` does the same with TRL's SFTTrainer; this one shows that any torch optimizer works.)

Runs offline on the bundled model (`assets/demo-llama`, 6.8M parameters) and data in a few minutes on 2 CPU cores:

    python examples/peqa_quickstart.py

Any Hub id or local path works for --model; larger models want a GPU and more --steps.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

import peqa_peft  # noqa: F401  (registers PEQA with PEFT)
from peqa_peft import PeqaConfig
from peqa_peft.workflows.data import format_alpaca
from peqa_peft.workflows.evaluate import load_eval_text, perplexity

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "assets" / "demo-llama"), help="Hub id or local path")
    p.add_argument("--alpaca", default=str(REPO / "assets" / "data" / "alpaca_data_5000.json"))
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--eval-tokens", type=int, default=65536, help="WikiText-2 test tokens to score (0 = all)")
    p.add_argument("--output-dir", default="outputs/peqa-quickstart")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def alpaca_batches(path: str, tokenizer, batch_size: int, seq_len: int, seed: int):
    """Endless batches of Alpaca examples with the loss on the response tokens only."""
    rows = json.loads(Path(path).read_text(encoding="utf-8"))
    rng = random.Random(seed)
    while True:
        rng.shuffle(rows)
        for start in range(0, len(rows) - batch_size + 1, batch_size):
            yield collate(rows[start : start + batch_size], tokenizer, seq_len)


def collate(rows, tokenizer, seq_len):
    ids, labels = [], []
    for row in rows:
        example = format_alpaca(row)
        p_ids = tokenizer(example["prompt"]).input_ids
        r_ids = tokenizer(example["completion"] + tokenizer.eos_token, add_special_tokens=False).input_ids
        seq = (p_ids + r_ids)[:seq_len]
        ids.append(seq)
        labels.append(([-100] * len(p_ids) + r_ids)[:seq_len])
    width = max(len(s) for s in ids)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in ids]),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in ids]),
        "labels": torch.tensor([s + [-100] * (width - len(s)) for s in labels]),
    }


def evaluate(model, eval_ids, label: str, seq_len: int) -> float:
    result = perplexity(model, input_ids=eval_ids, seq_len=seq_len, progress=False)
    print(f"  WikiText-2 test perplexity, {label:<28} {result.perplexity:9.2f}  ({result.tokens} tokens)")
    return result.perplexity


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    seq_len = min(args.seq_len, model.config.max_position_embeddings)
    eval_ids = tokenizer(load_eval_text("wikitext2"), return_tensors="pt").input_ids
    if args.eval_tokens:
        eval_ids = eval_ids[:, : args.eval_tokens]

    print(f"Model {args.model}: {model.num_parameters():,} parameters")
    ppl = {"fp32": evaluate(model, eval_ids, "fp32", seq_len)}

    config = PeqaConfig(bits=args.bits, group_size=args.group_size, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    ppl["quantized"] = evaluate(model, eval_ids, f"{args.bits}-bit PEQA init (no tuning)", seq_len)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    batches = alpaca_batches(args.alpaca, tokenizer, args.batch_size, seq_len, args.seed)
    model.train()
    progress = tqdm(range(args.steps), desc="PEQA fine-tune on Alpaca")
    for _ in progress:
        loss = model(**next(batches)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(loss=f"{loss.item():.3f}")
    ppl["peqa"] = evaluate(model, eval_ids, f"{args.bits}-bit PEQA after {args.steps} steps", seq_len)

    model.save_pretrained(args.output_dir)
    size = os.path.getsize(Path(args.output_dir) / "adapter_model.safetensors")
    print(f"Saved the scale adapter to {args.output_dir} ({size / 1024:.1f} KiB)")

    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(args.model), args.output_dir)
    probe = eval_ids[:, :seq_len]
    model.eval()
    with torch.no_grad():
        same = torch.equal(reloaded(probe).logits, model(probe).logits)
    print(f"Reloaded adapter gives identical logits: {same}")
    summary = {**{f"ppl_{k}": round(v, 3) for k, v in ppl.items()}, "adapter_bytes": size, "identical_reload": same}
    summary["seconds"] = round(time.time() - start, 1)
    print(json.dumps(summary))
    if not same:
        raise SystemExit("reloaded adapter does not reproduce the trained model")


if __name__ == "__main__":
    main()
