"""Measured resident bytes of PEQA-quantized layers and adapter file sizes, as a Markdown table.

    python benchmarks/peqa_memory.py [--model PATH_OR_ID]

Bytes are counted from the live tensors of the wrapped model (``peqa_peft.quantized_layer_bytes``) and from the
saved ``adapter_model.safetensors``; nothing is estimated.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

import peqa_peft
from peqa_peft import PeqaConfig
from peqa_peft.core.layer_memory import module_resident_bytes

REPO = Path(__file__).resolve().parents[1]


def measure(model_path: str, bits: int, group_size) -> dict:
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    fp32_model_bytes = module_resident_bytes(base)
    model = get_peft_model(base, PeqaConfig(bits=bits, group_size=group_size, task_type="CAUSAL_LM"))
    layers = peqa_peft.quantized_layer_bytes(model)
    numel = sum(e["numel"] for e in layers.values())
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        adapter = os.path.getsize(Path(tmp) / "adapter_model.safetensors")
    return {
        "bits": bits,
        "group_size": group_size or "channel",
        "codes_bpp": sum(e["codes"] for e in layers.values()) / numel,
        "qparams_bpp": sum(e["qparams"] for e in layers.values()) / numel,
        "layer_bpp": sum(e["total"] - e["adapter"] for e in layers.values()) / numel,
        "model_bytes": module_resident_bytes(model),
        "fp32_model_bytes": fp32_model_bytes,
        "adapter_bytes": adapter,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "assets" / "demo-llama"))
    parser.add_argument("--group-size", type=int, default=None)
    args = parser.parse_args()
    print(
        "| bits | groups | codes B/param | s0+z0 B/param | quantized layer B/param | whole model (MB) "
        "| fp32 model (MB) | adapter file |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for bits in (2, 3, 4, 8):
        r = measure(args.model, bits, args.group_size)
        print(
            f"| {r['bits']} | {r['group_size']} | {r['codes_bpp']:.4f} | {r['qparams_bpp']:.4f} "
            f"| {r['layer_bpp']:.4f} | {r['model_bytes'] / 1e6:.2f} | {r['fp32_model_bytes'] / 1e6:.2f} "
            f"| {r['adapter_bytes'] / 1024:.1f} KiB |"
        )


if __name__ == "__main__":
    main()
