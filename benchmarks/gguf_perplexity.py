"""WikiText-2 perplexity of a PEQA model in PyTorch vs its GGUF export in llama.cpp, on the same tokens.

The text is tokenized once with the base model's tokenizer and cut into non-overlapping windows; both engines score
exactly those token ids (llama.cpp through llama-cpp-python with all logits kept), so the two numbers differ only by
the engines' arithmetic and the GGUF storage (fp16 block scales, F16 embeddings, llama.cpp's 8-bit activation
rounding in its Q4_1 matmul).

    python benchmarks/gguf_perplexity.py --model assets/demo-llama --adapter outputs/peqa-w4 --max-tokens 65536
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_cpp_score import open_llama  # noqa: E402,F401  (torch-free, shared with the llama.cpp-only worker)

from peqa_peft.integrations.formats import export_adapter  # noqa: E402
from peqa_peft.workflows.evaluate import load_eval_text  # noqa: E402


@torch.no_grad()
def torch_nll(model, windows: list[list[int]]) -> float:
    total, count = 0.0, 0
    for window in windows:
        ids = torch.tensor([window])
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        total -= logp.gather(1, ids[0, 1:].unsqueeze(1)).sum().item()
        count += len(window) - 1
    return total / count


@contextlib.contextmanager
def dense_forward(model):
    """Inside the block, every PEQA layer (and bare ``QuantLinear``) of ``model`` runs as ``F.linear`` with its weight
    ``s * (q - z)`` dequantized ONCE, with the merged scales (``s0 + Δs``) the layer uses now.

    The same weights as the PEQA forward (which re-dequantizes them on every call: minutes per window of a 135M model
    on a loaded 2-core machine in eager mode), up to float summation order; for perplexity evaluation only.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    from peqa_peft.core import QuantLinear, dequantize_packed

    patched = []
    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and hasattr(module, "merged_qparams"):
            base = module.get_base_layer()
            scale, zero = module.merged_qparams()
        elif isinstance(module, QuantLinear) and not any(m is module for m, _ in patched):
            base, scale, zero = module, module.scale, module.zero_point
        else:
            continue
        if any(b is base for _, b in patched):
            continue  # the base of a PEQA layer patched above
        with torch.no_grad():
            weight = dequantize_packed(
                base.qweight, base.bits, base.out_features, base.in_features, scale.detach(), zero.detach(),
                torch.float32,
            )  # fmt: skip
        bias = None if base.bias is None else base.bias.detach().float()
        module.forward = lambda x, w=weight, b=bias: torch.nn.functional.linear(x, w, b)
        patched.append((module, base))
    try:
        yield len(patched)
    finally:
        for module, _ in patched:
            del module.forward


@torch.no_grad()
def dense_check(model, ids: list[int]) -> float:
    """Max |logit difference| between the PEQA forward and :func:`dense_forward` on ``ids``."""
    ids_t = torch.tensor([ids])
    ours = model(ids_t).logits
    with dense_forward(model):
        dense = model(ids_t).logits
    return (ours - dense).abs().max().item()


def llama_cpp_nll(path: Path, windows: list[list[int]], seq_len: int) -> float:
    llm = open_llama(path, n_ctx=seq_len, n_batch=seq_len, logits_all=True)
    try:
        return llama_cpp_window_nll(llm, windows)
    finally:
        llm.close()


def llama_cpp_window_nll(llm, windows: list[list[int]]) -> float:
    """Mean next-token NLL of ``windows`` under an open ``llama_cpp.Llama`` (created with ``logits_all=True``)."""
    total, count = 0.0, 0
    for window in windows:
        llm.reset()
        llm.eval(window)
        logp = torch.log_softmax(torch.tensor(np.array(llm.scores[: len(window)]), dtype=torch.float64)[:-1], -1)
        total -= logp.gather(1, torch.tensor(window[1:]).unsqueeze(1)).sum().item()
        count += len(window) - 1
    return total / count


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="assets/demo-llama")
    parser.add_argument("--adapter", required=True, help="a PEQA adapter directory")
    parser.add_argument("--max-tokens", type=int, default=65536)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--float-type", choices=("f16", "f32"), default="f16")
    args = parser.parse_args(argv)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokens = tokenizer(load_eval_text("wikitext2")).input_ids[: args.max_tokens]
    windows = [tokens[i : i + args.seq_len] for i in range(0, len(tokens) - args.seq_len + 1, args.seq_len)]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(args.model), args.adapter).eval()
    with tempfile.TemporaryDirectory() as tmp:
        out = export_adapter(args.model, args.adapter, Path(tmp) / "gguf", "gguf", float_type=args.float_type)
        ppl_cpp = float(np.exp(llama_cpp_nll(out / "model.gguf", windows, args.seq_len)))
    ppl_torch = float(np.exp(torch_nll(model, windows)))
    result = {
        "tokens": len(windows) * args.seq_len,
        "windows": len(windows),
        "seq_len": args.seq_len,
        "ppl_peqa_pytorch": ppl_torch,
        "ppl_gguf_llama_cpp": ppl_cpp,
        "relative_difference": ppl_cpp / ppl_torch - 1,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
