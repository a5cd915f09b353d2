"""Which quantizer should initialize PEQA? RTN, MSE-clipped RTN and GPTQ, before and after the same adaptation.

    python benchmarks/initializers.py [--bits 4 3 2] [--steps 60] [--eval-tokens 32768]

On the bundled demo Llama, for each bit width (per output channel, asymmetric):

- ``rtn``: PEQA's own round-to-nearest (``PeqaConfig(init_method="minmax")``),
- ``mse``: PEQA's MSE search (``init_method="mse"``, the default with groups), minimising ``||W - W_hat||_F^2``,
- ``gptq``: llm-compressor's GPTQ (the checkpoint ``outputs/ct-checkpoints/demo-llama-w{b}-asym-channel-gptq``,
  written by ``scripts/make_quantized_checkpoints.py`` in llm-compressor's venv, calibrated on 32 x 256 tokens of
  WikiText-2 *validation*), adopted as PEQA's base,

WikiText-2 test perplexity (256-token windows, the model's training context) is measured before and after the same
PEQA adaptation: ``--steps`` AdamW steps (lr 1e-3) of next-token loss on batches of 4 x 256 tokens of WikiText-2
validation text, scales only. Prints a Markdown table.

These are toy-model results (recorded with the clipping-only MSE search of before 2026-12-07). On the real models
(``benchmarks/real_models.py``, docs/guides/real-models.md) RTN beats MSE per channel, and at 4-bit group 32 the MSE
search and GPTQ are close (SmolLM2-135M WikiText-2 35.46 vs 35.12, fp32 30.64).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import peqa_peft  # noqa: F401
from peqa_peft import PeqaConfig
from peqa_peft.workflows.evaluate import load_eval_text, perplexity

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "assets" / "demo-llama"
CT_DIR = REPO / "outputs" / "ct-checkpoints"
SEQ_LEN, BATCH = 256, 4


def base_model(init: str, bits: int):
    """The PEQA model for one initializer (the float model is quantized by PEQA, or the GPTQ checkpoint adopted)."""
    if init == "gptq":
        path = CT_DIR / f"demo-llama-w{bits}-asym-channel-gptq"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; write it with scripts/make_quantized_checkpoints.py")
        return get_peft_model(AutoModelForCausalLM.from_pretrained(path), PeqaConfig(bits=bits))
    method = {"rtn": "minmax", "mse": "mse"}[init]
    return get_peft_model(AutoModelForCausalLM.from_pretrained(DEMO), PeqaConfig(bits=bits, init_method=method))


def adapt(model, train_ids: torch.Tensor, steps: int) -> None:
    windows = train_ids[: len(train_ids) // SEQ_LEN * SEQ_LEN].view(-1, SEQ_LEN)
    gen = torch.Generator().manual_seed(0)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(steps):
        batch = windows[torch.randint(0, len(windows), (BATCH,), generator=gen)]
        model(input_ids=batch, labels=batch).loss.backward()
        optim.step()
        optim.zero_grad()
    model.eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--inits", nargs="+", default=["rtn", "mse", "gptq"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    test_ids = tokenizer(load_eval_text("wikitext2"), return_tensors="pt").input_ids[0][: args.eval_tokens]
    train_text = (REPO / "assets" / "data" / "wikitext2_valid.tokens.txt").read_text(encoding="utf-8")
    train_ids = tokenizer(train_text, return_tensors="pt").input_ids[0]

    def ppl(model) -> float:
        with torch.no_grad():
            return perplexity(model, input_ids=test_ids, seq_len=SEQ_LEN, progress=False).perplexity

    fp32 = ppl(AutoModelForCausalLM.from_pretrained(DEMO))
    rows = []
    for bits in args.bits:
        for init in args.inits:
            start = time.perf_counter()
            model = base_model(init, bits)
            before = ppl(model)
            adapt(model, train_ids, args.steps)
            after = ppl(model)
            rows.append({"bits": bits, "init": init, "before": before, "after": after})
            print(json.dumps({**rows[-1], "seconds": round(time.perf_counter() - start, 1)}), flush=True)
    print(f"\nfp32: {fp32:.2f}\n")
    print(f"| bits | initializer | before PEQA | after {args.steps} PEQA steps |\n|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['bits']} | {r['init']} | {r['before']:.2f} | {r['after']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"fp32": fp32, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
