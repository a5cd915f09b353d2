"""Start PEQA from low bits: quantize while loading, or adopt a checkpoint that llm-compressor quantized.

    python examples/start_from_low_bits.py [--checkpoint DIR] [--output-dir outputs/low-bits]

1. ``from_pretrained(..., quantization_config=PeqaQuantizationConfig(bits=4))`` builds every linear layer of the
   bundled Llama as packed 4-bit codes while the checkpoint is read; the packed base is saved and reloaded.
2. A compressed-tensors checkpoint written by llm-compressor (default: the bundled 3-bit GPTQ one of the small
   aidreams260K model; ``scripts/make_quantized_checkpoints.py`` writes them for any model) is loaded with plain
   ``from_pretrained``; ``get_peft_model`` takes its integers, scales and zero-points as PEQA's base.

Each base gets a PEQA adapter, a few optimizer steps on a WikiText-2 window, and a save / reload / merge round trip
whose logits are compared.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import peqa_peft  # noqa: F401  (registers PEQA with PEFT and the "peqa" quantizer with transformers)
from peqa_peft import PeqaConfig, PeqaQuantizationConfig

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "assets" / "demo-llama"
GPTQ3 = REPO / "tests" / "fixtures" / "compressed_tensors" / "aidreams260K-llama-hf-w3-asym-channel-gptq"
TEXT = REPO / "assets" / "data" / "wikitext2_valid.tokens.txt"
TASK = "CAUSAL_LM"


def tune_save_reload(base_dir: Path, model, config: PeqaConfig, out: Path, steps: int) -> dict:
    """A few scale-only steps, then save the adapter, reload it onto a fresh base and merge: same logits each time."""
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    ids = tokenizer(TEXT.read_text()[:4000], return_tensors="pt").input_ids[:, :64]
    peft_model = get_peft_model(model, config)
    peft_model.print_trainable_parameters()
    optim = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(steps):
        loss = peft_model(ids, labels=ids).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
        print(f"  step {step}: loss {loss.item():.4f}")
    peft_model.eval()
    with torch.no_grad():
        tuned = peft_model(ids).logits
    peft_model.save_pretrained(out / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out / "adapter")
    with torch.no_grad():
        same_reload = torch.equal(reloaded(ids).logits, tuned)
        merged = reloaded.merge_and_unload()
        merged_diff = (merged(ids).logits - tuned).abs().max().item()
    adapter_kib = (out / "adapter" / "adapter_model.safetensors").stat().st_size / 1024
    print(
        f"  adapter {adapter_kib:.1f} KiB; reloaded logits identical: {same_reload}; merged |diff| {merged_diff:.1e}"
    )
    return {"identical_reload": same_reload, "merged_max_diff": merged_diff, "adapter_kib": round(adapter_kib, 1)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=GPTQ3, help="a compressed-tensors checkpoint directory")
    parser.add_argument("--output-dir", type=Path, default=REPO / "outputs" / "low-bits")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    print("1. quantize while loading (4-bit, per channel)")
    base = AutoModelForCausalLM.from_pretrained(DEMO, quantization_config=PeqaQuantizationConfig(bits=4))
    packed_dir = args.output_dir / "demo-llama-peqa4"
    base.save_pretrained(packed_dir)
    print(f"  packed base saved to {packed_dir} ({(packed_dir / 'model.safetensors').stat().st_size / 2**20:.1f} MiB)")
    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    tokenizer.save_pretrained(packed_dir)
    summary = {
        "quantize_on_load": tune_save_reload(
            packed_dir, base, PeqaConfig(bits=4, task_type=TASK), args.output_dir / "q", args.steps
        )
    }

    print(f"2. adopt the llm-compressor checkpoint {args.checkpoint.name}")
    scheme = json.loads((args.checkpoint / "config.json").read_text())["quantization_config"]["config_groups"]
    weights = scheme["group_0"]["weights"]
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint)
    config = PeqaConfig(bits=weights["num_bits"], group_size=weights["group_size"], task_type=TASK)
    summary["adopted"] = tune_save_reload(args.checkpoint, model, config, args.output_dir / "adopted", args.steps)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
