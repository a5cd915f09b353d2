"""Write real compressed-tensors checkpoints with llm-compressor, for PEQA to adopt (run in llm-compressor's venv).

llm-compressor pins versions that clash with this project's (see ``scripts/llmcompressor_env.sh``), so this script
never imports ``peqa_peft`` and runs with that virtualenv's python::

    bash scripts/llmcompressor_env.sh                       # once: creates /work/venvs/llmc
    /work/venvs/llmc/bin/python scripts/make_quantized_checkpoints.py --model assets/demo-llama \\
        --out outputs/ct-checkpoints --recipes w4-asym-channel-rtn w4-sym-g32-rtn w3-asym-channel-gptq

Each checkpoint directory also gets ``writer_logits.safetensors`` (the token ids of a fixed prompt and the logits
llm-compressor's own stack -- its transformers and compressed-tensors -- computes for them after reloading the saved
checkpoint) and ``writer.json`` (versions, recipe, how the writer reloaded it), so a test can compare the logits of
PEQA's adoption with those of the writer's own loader.

Recipes (``NAME`` = ``w{bits}-{sym|asym}-{channel|g{group}}-{rtn|gptq}``): RTN is llm-compressor's
``QuantizationModifier`` (round-to-nearest with min-max observers), GPTQ its ``GPTQModifier`` calibrated on
WikiText-2 *validation* windows (the test split stays unseen for perplexity). Grouped recipes skip the layers whose
input width the group does not divide (llm-compressor refuses them), as its error message recommends.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"
CALIBRATION_TEXT = REPO / "assets" / "data" / "wikitext2_valid.tokens.txt"
RECIPE_RE = re.compile(r"^w(?P<bits>[2-8])-(?P<sym>sym|asym)-(?P<gran>channel|g\d+)-(?P<algo>rtn|gptq)$")


def parse_recipe(name: str) -> dict:
    """``w4-asym-channel-rtn`` -> its fields; a clear error for anything else."""
    m = RECIPE_RE.match(name)
    if not m:
        raise ValueError(f"recipe {name!r} does not match w{{2..8}}-{{sym|asym}}-{{channel|gN}}-{{rtn|gptq}}")
    gran = m["gran"]
    return {
        "bits": int(m["bits"]),
        "symmetric": m["sym"] == "sym",
        "group_size": None if gran == "channel" else int(gran[1:]),
        "algorithm": m["algo"],
    }


def build_modifier(model, recipe: dict):
    """The llm-compressor modifier for ``recipe`` (integer weight-only, activations in 16 bits)."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    weights = {"num_bits": recipe["bits"], "type": "int", "symmetric": recipe["symmetric"]}
    if recipe["group_size"] is None:
        weights["strategy"] = "channel"
    else:
        weights.update(strategy="group", group_size=recipe["group_size"])
    ignore = ["lm_head"]
    if recipe["group_size"] is not None:
        widths = {m.in_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        for width in sorted(w for w in widths if w % recipe["group_size"]):
            names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if getattr(m, "in_features", 0) == width}
            ignore += [f"re:.*{name}$" for name in sorted(names)]
    config_groups = {"group_0": {"targets": ["Linear"], "weights": weights}}
    cls = GPTQModifier if recipe["algorithm"] == "gptq" else QuantizationModifier
    return cls(config_groups=config_groups, ignore=ignore)


def calibration_dataset(tokenizer, n_samples: int, seq_len: int):
    """``n_samples`` non-overlapping ``seq_len``-token windows of WikiText-2 validation text."""
    from datasets import Dataset

    ids = tokenizer(CALIBRATION_TEXT.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    windows = [ids[i * seq_len : (i + 1) * seq_len].tolist() for i in range(min(n_samples, len(ids) // seq_len))]
    return Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * seq_len for _ in windows]})


def writer_logits(out_dir: Path, tokenizer) -> str:
    """Reload the saved checkpoint with the writer's own stack and store the logits of ``PROMPT``."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    try:
        model, how = AutoModelForCausalLM.from_pretrained(out_dir), "compressed (default)"
        with torch.no_grad():
            logits = model(input_ids).logits
    except Exception as err:  # the writer's own compressed loader may not read what it wrote; say so
        print(f"  default (compressed) reload failed in the writer's stack: {type(err).__name__}: {err}")
        config = CompressedTensorsConfig(run_compressed=False)
        model = AutoModelForCausalLM.from_pretrained(out_dir, quantization_config=config)
        how = "run_compressed=False (dense), the compressed reload failed"
        with torch.no_grad():
            logits = model(input_ids).logits
    save_file(
        {"input_ids": input_ids.contiguous(), "logits": logits.float().contiguous()},
        out_dir / "writer_logits.safetensors",
    )
    return how


def make_checkpoint(model_path: Path, recipe_name: str, out_root: Path, n_samples: int, seq_len: int) -> Path:
    import compressed_tensors
    import llmcompressor
    import transformers
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = parse_recipe(recipe_name)
    out_dir = out_root / f"{model_path.name}-{recipe_name}"
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    modifier = build_modifier(model, recipe)
    kwargs = {}
    if recipe["algorithm"] == "gptq":
        kwargs = dict(dataset=calibration_dataset(tokenizer, n_samples, seq_len), num_calibration_samples=n_samples)
        kwargs["max_seq_length"] = seq_len
    start = time.perf_counter()
    oneshot(model=model, recipe=modifier, **kwargs)
    seconds = time.perf_counter() - start
    model.save_pretrained(out_dir, save_compressed=True)
    tokenizer.save_pretrained(out_dir)
    how = writer_logits(out_dir, tokenizer)
    meta = {
        "source_model": str(model_path.relative_to(REPO) if model_path.is_relative_to(REPO) else model_path),
        "recipe": recipe_name,
        **recipe,
        "calibration": (
            f"{n_samples} x {seq_len}-token windows of {CALIBRATION_TEXT.name}"
            if recipe["algorithm"] == "gptq"
            else None
        ),
        "oneshot_seconds": round(seconds, 1),
        "writer_reload": how,
        "prompt": PROMPT,
        "versions": {
            "llmcompressor": llmcompressor.__version__,
            "compressed-tensors": compressed_tensors.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "command": "python " + " ".join(sys.argv),
    }
    (out_dir / "writer.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{out_dir}: {recipe_name} in {seconds:.1f} s, writer reload: {how}")
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "assets" / "demo-llama")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "ct-checkpoints")
    parser.add_argument(
        "--recipes", nargs="+", default=["w4-asym-channel-rtn", "w4-sym-g32-rtn", "w3-asym-channel-gptq"]
    )
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args(argv)
    for name in args.recipes:
        parse_recipe(name)  # fail on a typo before any long run
    torch.manual_seed(0)
    for name in args.recipes:
        make_checkpoint(args.model.resolve(), name, args.out, args.calibration_samples, args.seq_len)


if __name__ == "__main__":
    main()
