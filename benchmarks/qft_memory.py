"""Measured QFT model-state bytes (weights / gradients / optimizer) against fp32 AdamW's 16 bytes per parameter.

    python benchmarks/qft_memory.py [--model PATH_OR_ID]

For each setting the bundled model is wrapped with QFT, trained for two IntLion steps on real Alpaca rows, and the
live tensors are counted after the second backward pass (gradients resident in standard mode, optimizer state
present): ``peqa_peft.core.layer_memory.model_state_bytes``. Nothing is estimated.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import peqa_peft  # noqa: F401  (registers QFT with PEFT)
from peqa_peft import IntLion, QftConfig
from peqa_peft.core.layer_memory import model_state_bytes
from peqa_peft.workflows.data import format_alpaca

REPO = Path(__file__).resolve().parents[1]
SETTINGS = [  # (base dtype, fused, int8 gradients, full_parameter)
    (torch.float32, False, True, True),
    (torch.float32, True, True, True),
    (torch.bfloat16, False, True, True),
    (torch.bfloat16, True, True, True),
    (torch.float32, False, True, False),
    (torch.float32, True, True, False),
    (torch.float32, False, False, True),
]


def batch(tokenizer, n: int = 4, seq_len: int = 128) -> dict:
    rows = json.loads((REPO / "assets" / "data" / "alpaca_en_demo.json").read_text())[:n]
    texts = [(lambda e: e["prompt"] + e["completion"])(format_alpaca(r)) for r in rows]
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=seq_len)
    enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return dict(enc)


def measure(model_path: str, dtype, fused: bool, int8_grads: bool, full_parameter: bool, inputs: dict) -> dict:
    """Model-state bytes per parameter, ``{"weights", "gradients", "optimizer"}``, after the second backward pass.

    ``full_parameter``: QftConfig's default (every parameter trainable: linears, embeddings and head as integer
    weights, norms in float); otherwise only the linear layers but the head, with the rest frozen in ``dtype``.
    """
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    n_params = sum(p.numel() for p in base.parameters())
    config = QftConfig(int8_gradients=int8_grads, full_parameter=full_parameter, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    optimizer = IntLion.from_model(model, lr=1e-5, fused=fused)
    for _ in range(2):
        model(**inputs).loss.backward()
        counted = model_state_bytes(model, optimizer)  # after backward: gradients resident in standard mode
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {k: v / n_params for k, v in counted.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "assets" / "demo-llama"))
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    inputs = batch(tokenizer)
    print(
        "| base dtype | QFT targets | mode | gradients | weights | grads | optimizer | total B/param "
        "| % of 16 B/param |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype, fused, int8_grads, full in SETTINGS:
        r = measure(args.model, dtype, fused, int8_grads, full, inputs)
        total = sum(r.values())
        print(
            f"| {str(dtype).removeprefix('torch.')} | {'all parameters' if full else 'linear only'} "
            f"| {'fused' if fused else 'standard'} | {'int8' if int8_grads else 'fp32'} | {r['weights']:.3f} "
            f"| {r['gradients']:.3f} | {r['optimizer']:.3f} | {total:.3f} | {100 * total / 16:.2f}% |"
        )


if __name__ == "__main__":
    main()
